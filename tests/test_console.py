"""bvvit.console: one way to print. INFO lines go to stdout as written, warnings and errors to
stderr as one line, and ranks > 0 of a torchrun job keep quiet."""

import logging

from bvvit.console import configure_console


def test_info_to_stdout_and_warnings_to_stderr_undecorated(capsys):
    configure_console(rank=0)
    log = logging.getLogger("bvvit.somewhere")
    log.info("fp32: top-1 88.93%")
    log.warning("WARNING [w4a4]: head was asked to be quantized but is still float")
    log.error("post_training.py: error: no such file")
    captured = capsys.readouterr()
    assert captured.out == "fp32: top-1 88.93%\n"
    assert captured.err == ("WARNING [w4a4]: head was asked to be quantized but is still float\n"
                            "post_training.py: error: no such file\n")


def test_other_ranks_say_only_errors(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    configure_console()
    log = logging.getLogger("bvvit.somewhere")
    log.info("epoch 1/2: ...")
    log.warning("warning: --workers capped")
    log.error("run.py: error: bad flag")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "run.py: error: bad flag\n"
    configure_console(rank=0)
    log.info("back")
    assert capsys.readouterr().out == "back\n"


def test_no_module_prints():
    """Everything the package says goes through logging (the signal watchdog's last line
    excepted: it must come out even when the main thread is blocked holding a lock)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bvvit"
    printing = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert len(printing) == 1 and printing[0].startswith("train/signals.py:"), printing
