"""orthogonal_regularization against the term PEFT's AdaLoraModel.forward adds to the loss."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from companion.adalora import (add_orthogonal_regularization, adalora_pairs, copy_adapter_weights_from_peft,
                               inject_adalora, orthogonal_regularization)

TARGETS = ["query", "value", "intermediate.dense"]


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return BertForSequenceClassification(config)


def batch():
    g = torch.Generator().manual_seed(3)
    return dict(input_ids=torch.randint(0, 50, (4, 7), generator=g), labels=torch.tensor([0, 1, 1, 0]))


def test_peft_form_equals_what_peft_adds_to_the_loss_bit_for_bit():
    peft_model = get_peft_model(tiny_bert(), AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_modules=TARGETS,
                                                           total_step=10, orth_reg_weight=0.3))
    ours = inject_adalora(tiny_bert(), TARGETS, init_r=4, trainable_modules=("classifier",))
    copy_adapter_weights_from_peft(ours, peft_model)
    plain = ours(**batch()).loss
    handle = add_orthogonal_regularization(ours, 0.3)
    with_reg = ours(**batch()).loss
    assert torch.equal(peft_model(**batch()).loss, with_reg)
    assert torch.equal(with_reg, plain + 0.3 * orthogonal_regularization(adalora_pairs(ours)))
    handle.remove()
    assert torch.equal(ours(**batch()).loss, plain)
    assert ours(input_ids=batch()["input_ids"]).loss is None  # no labels: nothing is added


def test_defaults_are_the_mean_of_plain_frobenius_norms_and_the_paper_form_is_eq_4():
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(6, 3, generator=gen), torch.randn(3, 5, generator=gen)) for _ in range(2)]
    eye = torch.eye(3)
    norms = [(torch.linalg.matrix_norm(P.T @ P - eye), torch.linalg.matrix_norm(Q @ Q.T - eye)) for P, Q in pairs]
    peft_form = sum(a + b for a, b in norms) / 4
    eq_4 = sum(a ** 2 + b ** 2 for a, b in norms)
    torch.testing.assert_close(orthogonal_regularization(pairs), peft_form)
    torch.testing.assert_close(orthogonal_regularization(pairs, squared=True, mean=False), eq_4)


def test_orthonormal_singular_vectors_have_zero_penalty():
    Q_full, _ = torch.linalg.qr(torch.randn(8, 8))
    P, Q = Q_full[:, :3], Q_full[:3]  # orthonormal columns / rows
    assert orthogonal_regularization([(P, Q)], squared=True, mean=False).item() < 1e-10


def test_bad_regulariser_inputs_raise():
    with pytest.raises(ValueError, match="at least one"):
        orthogonal_regularization([])
    with pytest.raises(ValueError, match=r"pass \(lora_B, lora_A\)"):
        orthogonal_regularization([(torch.randn(3, 5), torch.randn(3, 5))])
    with pytest.raises(ValueError, match="orth_reg_weight must be >= 0"):
        add_orthogonal_regularization(inject_adalora(tiny_bert(), TARGETS), -0.1)
