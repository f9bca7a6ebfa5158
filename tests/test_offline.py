"""The `ci` profile must never touch the network: no hub download, not even a DNS lookup.

A child Python process installs an audit hook (PEP 578) that records every socket event,
then runs the ci-profile code paths the notebooks use: MiniLM from the installed wheel, the
generated data, LoRA through PEFT, two training steps, a tiny Llama quantized to 4 bit by
bitsandbytes, and the memory accounting. The HF_*_OFFLINE variables are removed from the
child's environment, so the test shows that the code itself asks for nothing remote.
"""

import json
import os
import subprocess
import sys
import textwrap

CI_RUN = textwrap.dedent("""
    import json, sys
    events = []
    def audit(event, args):
        if event.startswith("socket."):
            events.append([event, repr(args)[:200]])
    sys.addaudithook(audit)

    import torch
    from peft import LoraConfig, get_peft_model
    from companion.data import make_instruction_splits, encode_instructions, sentiment_dataloaders
    from companion.measure import load_in_4bit, stored_bytes
    from companion.memory import footprint
    from companion.models import build_tiny_llama, char_tokenizer, load_minilm_classifier, load_minilm_encoder
    from companion.profiles import setup_profile
    from companion.train import TrainConfig, train

    setup_profile("ci", seed=0)
    model, tok = load_minilm_classifier(num_labels=2, seed=0)
    load_minilm_encoder()
    loaders = sentiment_dataloaders(tok, batch_size=8, seed=0, n_train=16, n_validation=8, n_test=8)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train(model, loaders["train"], opt, TrainConfig(max_steps=2, progress=False))

    llama = load_in_4bit(build_tiny_llama(seed=0), double_quant=True)
    batch = encode_instructions(make_instruction_splits(seed=0, n_train=8, n_test=5)["train"][:4],
                                char_tokenizer())
    assert torch.isfinite(llama(**batch).loss)
    footprint("llama-7b", "qlora", double_quant=True)
    stored_bytes(llama)
    print("EVENTS=" + json.dumps(events))
""")


def test_a_ci_profile_run_opens_no_socket():
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", CI_RUN], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("EVENTS=")][-1]
    events = json.loads(line.removeprefix("EVENTS="))
    assert events == [], f"socket activity in the ci profile: {events[:10]}"


def test_the_audit_hook_does_see_a_socket_when_one_is_opened():
    """The check above can fail: the same hook records a plain socket creation and a DNS lookup."""
    probe = textwrap.dedent("""
        import json, socket, sys
        events = []
        sys.addaudithook(lambda e, a: events.append(e) if e.startswith("socket.") else None)
        s = socket.socket(); s.close()
        try:
            socket.getaddrinfo("localhost", 80)
        except OSError:
            pass
        print(json.dumps(events))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "socket.__new__" in seen and "socket.getaddrinfo" in seen
