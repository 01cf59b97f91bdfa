"""`ulskip serve`: bad flags are one line and exit 2; the real command serves and shuts down on SIGINT."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

# CI installs the serving packages (.ci/run checks they import); a GPU machine without them skips these
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from helpers import make_checkpoint

from ulskip.cli import ExitStatus, main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-llama", num_layers=4)


@pytest.mark.parametrize("flags,match", [
    (["--port", "0"], "--port must be in [1, 65535], got 0"),
    (["--port", "70000"], "--port must be in [1, 65535]"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--max-queue", "0"], "--max-queue"),
    (["--prefill-chunk", "0"], "--prefill-chunk"),
    (["--max-seq-len", "1"], "--max-seq-len"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--dtype", "int8"], "--dtype"),
    (["--target-speedup", "2", "--strategy", "skipdecode"], "--strategy must be a static policy"),
    (["--served-model-name", " "], "--served-model-name"),
])
def test_bad_flags(ckpt, flags, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", ckpt, *flags])
    assert isinstance(e.value.code, ExitStatus) and int(e.value.code) == 2
    assert match in str(e.value.code)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path / "nope")])
    assert int(e.value.code) == 2 and "does not exist" in str(e.value.code)


def test_serve_command_end_to_end(ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.Popen([sys.executable, "-m", "ulskip.cli", "serve", ckpt, "--target-speedup", "2", "--port",
                          str(port), "--device", "cpu", "--max-batch-size", "2", "--max-seq-len", "64"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        t0 = time.time()
        while True:
            assert p.poll() is None, p.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < 60, "server did not come up"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny-llama"]  # the folder's name
        r = c.completions.create(model="tiny-llama", prompt="the sky is", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "serving 'tiny-llama': 2 of 4 layers" in out
