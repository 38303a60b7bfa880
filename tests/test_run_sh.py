# run.sh hands each extra --key=value to the training scripts that have that setting, and refuses one that none
# has before any work starts. Run in a copy of the repository's run.sh with install, Python and the speech faked.
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fake_checkout(tmp_path):
    for f in ("run.sh", "train_semantic.py", "train_emotion.py"):
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "install.sh").write_text("true\n")
    py = tmp_path / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text('#!/bin/bash\necho "PY $*"\n')   # prints each command run.sh would run
    py.chmod(0o755)
    (tmp_path / "speech" / "emo_test").mkdir(parents=True)
    for e in ("happy", "sad"):
        (tmp_path / "speech" / "emo_test" / f"a_{e}.flac").touch()
    return tmp_path


def test_flags_reach_the_scripts_that_take_them(tmp_path):
    root = fake_checkout(tmp_path)
    p = subprocess.run(["bash", "run.sh", "--ctc_steps=0", "--max_steps=5", "--llm=qwen2.5-0.5b", "--head_warmup_steps=3"],
                       cwd=root, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    runs = {line.split()[1]: line.split()[2:] for line in p.stdout.splitlines() if line.startswith("PY ")}
    assert runs["train_semantic.py"] == ["--whisper=checkpoints/whisper-base", "--llm=checkpoints/qwen2.5-0.5b-instruct",
                                         "--ctc_steps=0", "--max_steps=5"]
    assert runs["train_emotion.py"] == ["--max_steps=5", "--head_warmup_steps=3"]
    assert runs["scripts/prepare.py"] == ["--llm=qwen2.5-0.5b"]


def test_a_setting_no_script_has_is_refused_before_any_work(tmp_path):
    root = fake_checkout(tmp_path)
    p = subprocess.run(["bash", "run.sh", "--ctc_step=0"], cwd=root, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no setting 'ctc_step'" in p.stderr
    assert "PY " not in p.stdout   # not even prepare ran


def test_budget_picks_the_recipe_and_a_wrong_one_is_refused(tmp_path):
    root = fake_checkout(tmp_path)
    p = subprocess.run(["bash", "run.sh", "--budget=1h", "--seed=1"], cwd=root, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    runs = {line.split()[1]: line.split()[2:] for line in p.stdout.splitlines() if line.startswith("PY ")}
    assert runs["train_semantic.py"][2:] == ["config/budget_1h_stage1.py", "--seed=1"]   # the preset, then the flags
    assert runs["train_emotion.py"] == ["config/budget_1h_stage2.py", "--seed=1"]
    p = subprocess.run(["bash", "run.sh"], cwd=root, capture_output=True, text=True, timeout=60)
    assert [line.split()[2:] for line in p.stdout.splitlines() if line.startswith("PY train_emotion.py")] == [[]]
    p = subprocess.run(["bash", "run.sh", "--budget=30m"], cwd=root, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--budget is 2h (the default) or 1h, not '30m'" in p.stderr and "PY " not in p.stdout
