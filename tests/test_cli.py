"""The command line: train / sample / info / routes / bench, and one-line errors for bad input."""

import ast
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import on_host_only

from minimoe import GPT, Config, checkpoint, cli, commands, data
from minimoe import train as train_module
from minimoe.errors import CheckpointError, DataError, OptionError, UserError
from minimoe.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-experts", "4", "--top-k", "2",
        "--block-size", "32", "--batch-size", "8", "--lr", "1e-2", "--warmup-iters", "5",
        "--eval-iters", "4"]  # fmt: skip


def run_cli(capsys, *argv):
    """cli.main in this process -> (exit status, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_module(*argv, timeout=120):
    """`python -m minimoe ...` in a subprocess (the real entry point)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "minimoe", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)  # fmt: skip


def assert_one_line_error(rc, err):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tasks.txt"
    path.write_text(data.synthetic_corpus(1500, seed=0), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One small run through the real CLI, shared by the sample/info/routes tests."""
    out = tmp_path_factory.mktemp("run")
    proc = run_module("train", "--data", corpus, "--out", out, "--max-iters", 60, "--eval-interval", 30,
                      "--log-interval", 10, "--sample-tokens", 40, *TINY)  # fmt: skip
    return out, proc


def test_train_command(trained):
    out, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # not a terminal: one progress line per log interval, then the eval lines, the end, a sample
    assert "step 10/60 | loss" in proc.stdout and "tok/s" in proc.stdout and "ETA" in proc.stdout
    assert "step 60: train loss" in proc.stdout and "val loss" in proc.stdout
    assert "--- sample ---" in proc.stdout
    assert (out / "ckpt.npz").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 50, 60]


def test_sample_command(trained, capsys):
    out, _ = trained
    rc, text, err = run_cli(capsys, "sample", "--ckpt", out, "--prompt", "add 1", "--max-new-tokens", 30,
                            "--seed", 3)  # fmt: skip
    assert rc == 0, err
    assert text.startswith("add 1") and len(text.rstrip("\n")) >= 5
    # seeded: the same command gives the same text; greedy with and without the cache agree
    assert (
        run_cli(capsys, "sample", "--ckpt", out, "--prompt", "add 1", "--max-new-tokens", 30, "--seed", 3)[1]
        == text
    )
    greedy = ["sample", "--ckpt", out, "--prompt", "copy ab", "--max-new-tokens", 40, "--temperature", 0]
    assert run_cli(capsys, *greedy)[1] == run_cli(capsys, *greedy, "--no-cache")[1]


def test_info_preset_json(capsys):
    rc, out, _ = run_cli(capsys, "info", "--preset", "mixtral", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["total"] > info["active"] > 0 and info["flops_per_token"] > 0
    assert info["config"]["n_experts"] == 8 and info["config"]["top_k"] == 2
    rc, same, _ = run_cli(capsys, "info", "mixtral", "--json")  # a preset name without --preset
    assert rc == 0 and json.loads(same) == info
    rc, out, _ = run_cli(capsys, "info", "--preset", "mixtral-8x7b")
    assert rc == 0 and "counted, never built" in out and "expert_hidden" in out and "active per token" in out


def test_info_checkpoint(trained, capsys):
    out, _ = trained
    rc, text, _ = run_cli(capsys, "info", "--ckpt", out, "--json")
    assert rc == 0
    info = json.loads(text)
    tr = info["training"]
    assert tr["iterations"] == 60 and tr["tokens_seen"] == 60 * 8 * 32
    assert tr["val_loss"] > 0 and tr["train_loss"] > 0 and tr["wall_time_s"] > 0
    assert info["config"]["n_layer"] == 2 and info["total"] > info["active"]
    rc, same, _ = run_cli(capsys, "info", out, "--json")  # a path without --ckpt
    assert rc == 0 and json.loads(same) == info
    rc, text, _ = run_cli(capsys, "info", "--ckpt", out)
    assert rc == 0 and "60 of 60 steps" in text and "last val loss" in text


def test_routes_table_and_plot(trained, capsys, tmp_path):
    out, _ = trained
    rc, text, err = run_cli(capsys, "routes", "--ckpt", out, "--text", "add 12+3=15")
    assert rc == 0, err
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("pos"))
    assert "layer 0" in lines[header] and "layer 1" in lines[header]
    rows = lines[header + 1 : header + 12]
    assert len(rows) == 11  # one row per character token
    for row in rows:
        cells = row.split()[2:]
        assert len(cells) == 2  # two MoE layers
        for cell in cells:
            experts = [int(e) for e in cell.split(",")]
            assert len(experts) == 2 and len(set(experts)) == 2 and all(0 <= e < 4 for e in experts)
    assert "chance 25.0%" in text  # first-choice baseline 1/E for E = 4

    pytest.importorskip("matplotlib", reason="the --plot heat map needs matplotlib")
    png = tmp_path / "routes.png"
    rc, text, err = run_cli(capsys, "routes", "--ckpt", out, "--text", "add 12+3=15", "--plot", png)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bpe_tokenizer_via_cli(corpus, tmp_path, capsys):
    out = tmp_path / "bpe"
    argv = [
        "--tokenizer",
        "bpe",
        "--vocab-size",
        300,
        "--max-iters",
        4,
        "--eval-interval",
        4,
        "--sample-tokens",
        5,
    ]
    rc, text, err = run_cli(capsys, "train", "--data", corpus, "--out", out, *argv, *TINY)
    assert rc == 0, err
    ck = checkpoint.load_checkpoint(out)
    assert ck.tokenizer["type"] == "bpe" and ck.config.vocab_size == 300
    rc, text, err = run_cli(capsys, "sample", "--ckpt", out, "--prompt", "gram the", "--max-new-tokens", 5)
    assert rc == 0 and text.startswith("gram the")


def test_ctrl_c_saves_a_checkpoint(corpus, tmp_path):
    out = tmp_path / "int"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "minimoe", "train", "--data", str(corpus), "--out", str(out),
            "--max-iters", "100000", "--log-interval", "1", "--eval-interval", "100000", *TINY]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        for line in proc.stdout:  # wait until training runs
            if line.startswith("step 2/"):
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    step = checkpoint.load_checkpoint(out).train_state["iteration"]
    assert step >= 2
    # and the run goes on from there
    proc = run_module("train", "--out", out, "--resume", "--max-iters", step + 2, "--sample-tokens", 0)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.load_checkpoint(out).train_state["iteration"] == step + 2


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp_path / "short.txt").write_text("just a few words\n", encoding="utf-8")
    (tmp_path / "junk" / "ckpt.npz").parent.mkdir()
    (tmp_path / "junk" / "ckpt.npz").write_bytes(b"\x00garbage" * 50)
    return tmp_path


BAD = [
    (["train", "--data", "{d}/missing.txt"], "no file exists"),
    (["train", "--data", "{d}/empty.txt"], "is empty"),
    (["train", "--data", "{d}/latin1.txt"], "not valid UTF-8"),
    (["train", "--data", "{d}/short.txt"], "too few for --block-size"),
    (["train", "--preset", "gpt9"], "valid presets"),
    (["train", "--preset", "mixtral", "--n-experts", "4", "--top-k", "5"], "--top-k = 5"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--n-layer", "-1"], "--n-layer"),
    (["train", "--lr", "abc"], "--lr"),
    (["train", "--resume", "--out", "{d}/nothing"], "no checkpoint"),
    (["train", "--resume", "--out", "{d}/junk"], "truncated or corrupt"),
    (["sample", "--ckpt", "{d}/junk"], "truncated or corrupt"),
    (["sample", "--ckpt", "{d}/nothing"], "no checkpoint"),
    (["info", "--preset", "gpt9"], "unknown preset"),
    (["info"], "info needs one thing to describe"),
    (["info", "gpt9"], "'gpt9' is neither a run directory or checkpoint file that exists nor a preset"),
    (["info", "mixtral", "--preset", "dense"], "got 2"),
    (["routes", "--ckpt", "{d}/junk", "--text", "hi"], "corrupt"),
    (["routes", "--ckpt", "{d}/junk", "--text", "hi", "--max-rows", "0"], "--max-rows = 0 is invalid"),
    (["sample", "--ckpt", "{d}/junk", "--temperature", "-1"], "--temperature = -1.0 is invalid"),
    (["sample", "--ckpt", "{d}/junk", "--top-k", "0"], "--top-k = 0 is invalid"),
    (["sample", "--hf", "{d}/nothing"], "not a local model folder"),
    (["train", "--max-iters", "ten"], "--max-iters: invalid int value"),
    (["train", "--dtype", "float16"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,match", BAD, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_is_one_error_line(bad_files, capsys, argv, match):
    argv = [a.format(d=bad_files) for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err)
    assert match in err


def test_bad_input_in_a_real_process(bad_files):
    proc = run_module("train", "--data", bad_files / "latin1.txt")
    assert_one_line_error(proc.returncode, proc.stderr)
    proc = run_module("sample", "--ckpt", bad_files / "junk")
    assert_one_line_error(proc.returncode, proc.stderr)


def test_prompt_outside_vocabulary(trained, capsys):
    out, _ = trained
    rc, _, err = run_cli(capsys, "sample", "--ckpt", out, "--prompt", "Ω")
    assert_one_line_error(rc, err)
    assert "not in the vocabulary" in err


def test_routes_on_a_dense_model(tmp_path, capsys):
    model = GPT(Config(flavour="llama", vocab_size=3, block_size=8, n_layer=1, n_head=2, n_embd=8))
    checkpoint.save_checkpoint(tmp_path, model, tokenizer=CharTokenizer(list("abc")))
    rc, _, err = run_cli(capsys, "routes", "--ckpt", tmp_path, "--text", "abc")
    assert_one_line_error(rc, err)
    assert "dense" in err


@on_host_only("CuPy (real or fake) is importable there, so --device gpu trains")
def test_gpu_without_a_gpu(capsys):
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present")
    except Exception:
        pass
    rc, _, err = run_cli(capsys, "train", "--device", "gpu", "--max-iters", 1)
    assert_one_line_error(rc, err)
    assert "cupy" in err.lower()


def test_bench_dispatch(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(commands.bench, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--what", "ops"]) == 0
    assert seen == [["--what", "ops"]]


def test_sample_from_hf_folder(monkeypatch, capsys, tmp_path):
    model = GPT(Config(flavour="llama", vocab_size=4, block_size=8, n_layer=1, n_head=2, n_embd=8))
    tok = CharTokenizer(list("abcd"))
    (tmp_path / "config.json").write_text("{}")
    calls = []
    fake = types.SimpleNamespace(load_pretrained=lambda path: calls.append(path) or (model, tok))
    monkeypatch.setattr(commands, "hf", fake)
    rc, out, err = run_cli(
        capsys, "sample", "--hf", tmp_path, "--prompt", "ab", "--max-new-tokens", 6, "--seed", 0
    )
    assert rc == 0, err
    assert calls == [str(tmp_path)]
    assert out.startswith("ab") and len(out.strip()) == 8 and set(out.strip()) <= set("abcd")
    fake.load_pretrained = lambda path: (model, None)  # a folder without tokenizer.json
    rc, _, err = run_cli(capsys, "sample", "--hf", tmp_path, "--prompt", "ab")
    assert_one_line_error(rc, err)
    assert "tokenizer" in err


def test_seeded_cli_sampling_matches_generate(trained, capsys):
    from minimoe.sample import generate

    out, _ = trained
    model, tok, _ = checkpoint.load_model(out)
    ids = generate(model, tok.encode("rev ab"), 12, temperature=1.0, top_k=5, seed=9)
    rc, text, _ = run_cli(capsys, "sample", "--ckpt", out, "--prompt", "rev ab", "--max-new-tokens", 12,
                          "--top-k", 5, "--temperature", 1, "--seed", 9)  # fmt: skip
    assert rc == 0 and text == "rev ab" + tok.decode(ids) + "\n"


def test_a_bug_keeps_its_traceback(corpus, tmp_path, monkeypatch, capsys):
    """Only user errors become an `error:` line: a ValueError from inside training is a bug."""

    def broken_step(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(train_module, "train_step", broken_step)
    argv = ["train", "--data", corpus, "--out", tmp_path, "--max-iters", 2, "--sample-tokens", 0, *TINY]
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main([str(a) for a in argv])
    # a bad flag is still one line and status 2
    rc, _, err = run_cli(capsys, "train", "--max-iters", 0)
    assert_one_line_error(rc, err)
    assert "--max-iters = 0 is invalid" in err


def test_a_bug_in_a_real_process_prints_a_traceback(corpus, tmp_path):
    code = (
        "import sys, minimoe.train as t\n"
        "def broken_step(*a, **k):\n    raise ValueError('an internal bug')\n"
        "t.train_step = broken_step\n"
        "from minimoe.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["train", "--data", corpus, "--out", tmp_path, "--max-iters", 2, "--sample-tokens", 0, *TINY]
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode not in (0, 2)
    assert "Traceback" in proc.stderr and "ValueError: an internal bug" in proc.stderr
    assert "error: " not in proc.stderr


def test_user_errors_are_one_family():
    assert issubclass(cli.CliError, UserError)
    for cls in (CheckpointError, DataError, OptionError):
        assert issubclass(cls, UserError)


def test_cli_imports_minimoe_at_module_level_only():
    """Function-level imports hid import cycles; only optional packages may be imported lazily."""
    optional = {"matplotlib", "tqdm", "torch", "transformers", "cupy", "tokenizers", "threadpoolctl"}
    for name in ("cli", "train", "options", "progress", "signals", "metrics", "info", "checkpoint"):
        tree = ast.parse((ROOT / "minimoe" / f"{name}.py").read_text(encoding="utf-8"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    mods = [node.module or ""]
                else:
                    continue
                for mod in mods:
                    assert mod.split(".")[0] in optional, f"minimoe/{name}.py: {fn.name} imports {mod}"
