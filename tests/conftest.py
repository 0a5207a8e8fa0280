"""Shared fixtures: a tiny word tokenizer and tiny random-init teacher/student pairs."""

from __future__ import annotations

import copy
import os
import secrets
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Ray reads RAY_AUTH_MODE once per process, when it is first imported: a test that imports a job
# module (and so ray) before a Ray test sets the mode would leave the process unable to talk to
# the token-auth clusters the Ray tests start. Set it for the whole session, before any import.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from kdtw.config import ModelConfig  # noqa: E402
from kdtw.models import LM, init_model, make_student  # noqa: E402
from kdtw.tokenizer import build_word_tokenizer  # noqa: E402

WORDS = [f"w{i}" for i in range(40)] + "With no light full teacher use , do :".split()
PROMPTS = [
    "With light teacher use, do: w1 w2 w3",
    "With no teacher use, do: w4",
    "With full teacher use, do: w5 w6 w7 w8 w9 w10",
]


@pytest.fixture(scope="session")
def tok():
    return build_word_tokenizer(WORDS)


def _pair(arch: str, tok, *, close: bool):
    """Teacher and student of one architecture; with ``close`` the student shares the
    teacher's embeddings and first layer (a drafter that agrees often)."""
    t_spec = ModelConfig(arch=arch, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, tie_embeddings=False)
    s_spec = ModelConfig(arch=arch, hidden_size=48 if close else 16, num_layers=1, num_heads=4 if close else 2,
                         intermediate_size=96 if close else 32, tie_embeddings=False)
    tm = init_model(t_spec, tok, seed=1)
    sm = init_model(s_spec, tok, seed=2)
    if close:
        own = sm.state_dict()
        own.update({k: v for k, v in tm.state_dict().items() if k in own and own[k].shape == v.shape})
        sm.load_state_dict(own)
    return LM(tm, copy.deepcopy(tok)), make_student(sm, copy.deepcopy(tok))


@pytest.fixture(scope="session", params=["llama", "t5"])
def pair(request, tok):
    return _pair(request.param, tok, close=False)


@pytest.fixture(scope="session")
def llama_close(tok):
    return _pair("llama", tok, close=True)


@pytest.fixture(scope="session")
def t5_close(tok):
    return _pair("t5", tok, close=True)


def signal_when(cmd: list[str], seen: str, *, env=None, before=None, wait_s: float = 300, stop_s: float = 240):
    """Run ``cmd`` (from the repository root); when a line of its stdout holds ``seen``, call
    ``before(proc)`` (to look at it while it runs) and send SIGINT. Returns (return code, stdout
    lines, stderr, what ``before`` returned). Fails if the line never comes or the process ends
    first; the process never outlives the call."""
    import signal
    import subprocess
    import threading
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + wait_s
        while time.time() < deadline and proc.poll() is None and not any(seen in ln for ln in lines):
            time.sleep(0.2)
        assert proc.poll() is None and any(seen in ln for ln in lines), \
            f"no {seen!r} while running: " + "".join(lines)[-3000:] + (proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        got = before(proc) if before is not None else None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=stop_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, lines, err, got
