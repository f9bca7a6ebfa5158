import subprocess
import sys

from companion import check_env


def test_collect_reports_versions_cuda_and_a_profile():
    facts = check_env.collect()
    for key in ("python", "torch", "transformers", "peft", "bitsandbytes", "cuda available",
                "bf16 native", "recommended PROFILE"):
        assert key in facts
    assert facts["torch"] != "not installed"
    assert facts["recommended PROFILE"].split()[0] in ("ci", "gpu")


def test_missing_distribution_is_reported_not_raised():
    assert check_env.version_of("surely-not-an-installed-distribution") == "not installed"


def test_recommendation_follows_cuda():
    assert check_env.recommend_profile(False).startswith("ci")
    assert check_env.recommend_profile(True).startswith("gpu")


def test_module_runs_from_the_command_line_and_prints_a_table():
    out = subprocess.run([sys.executable, "-m", "companion.check_env"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["item", "value"]
    assert any(line.startswith("recommended PROFILE") for line in lines)


def test_book_facts_name_both_editions_and_how_to_get_the_browser():
    found = check_env.book_facts(which=lambda name: f"/usr/bin/{name}" if name in ("chromium", "npm") else None)
    assert found["npm (Mermaid for the book)"] == "/usr/bin/npm"
    assert found["English edition"].startswith("_build/html/index.html")
    assert found["Chinese edition"].startswith("_build/html/zh/index.html (中文版")
    assert found["offline check browser"] == "/usr/bin/chromium"
    nothing = check_env.book_facts(which=lambda name: None)
    assert nothing["npm (Mermaid for the book)"].startswith("not found") and "apt-get install npm" in nothing["npm (Mermaid for the book)"]
    missing = nothing["offline check browser"]
    assert missing.startswith("not found") and "apt-get install chromium" in missing and "playwright install" in missing
