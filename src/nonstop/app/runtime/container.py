"""PodmanRuntime and DockerRuntime: one code path over the engines' shared CLI.

An instance is ``<engine> run -d --name NAME ...``; its exit status comes from ``<engine> wait``
(a child process per instance, so nothing polls); signals go through ``<engine> kill --signal``.
Before a launch and after an exit the container is removed (``rm -f``), so a crashed supervisor
never leaves one behind for long, and ``cleanup()`` removes it on stop.

Podman on this machine kind needs ``--runtime runc`` (crun fails) and ulimits within the host's
hard limits (nofile 20000; the default nproc is refused). Docker takes the same run flags
(``--runtime runc`` is its default runtime's name); its engine does not run here.

``ensure_python_image()`` builds ``localhost/nonstop-python:3.11`` when it is missing: a rootfs
with this interpreter (same path as on the host), its standard library without tests, msgspec,
and the shared libraries they link against, imported with ``podman import`` (no registry needed).
Code is bind-mounted, not baked in, so the image is built once and cached by name;
``remove_python_image()`` deletes it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile

from nonstop.app.runtime import ExitStatus, LaunchError
from nonstop.app.runtime.spec import ServiceConfig
from nonstop.spawn import PIPE, Child, spawn

PYTHON_IMAGE = "localhost/nonstop-python:3.11"
STATE_MOUNT = "/state"
LABEL = "nonstop.service"  # on every container a supervisor runs: `nonstop service clean`


def network(spec: str) -> str:
    """``ns:PATH`` naming the namespace we run in becomes ``host``: runc refuses podman's
    default sysctls (net.ipv4.ping_group_range) in what it sees as the host's namespace."""
    if spec.startswith("ns:"):
        try:
            a, b = os.stat(spec[3:]), os.stat("/proc/self/ns/net")
        except OSError:
            return spec
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return "host"
    return spec


def ensure_cgroup_mounts() -> list[str]:
    """Mount the cgroup hierarchies runc needs when ``ip netns exec`` hid them.

    ``ip netns exec`` runs its command in a private mount namespace with a fresh /sys and no
    cgroup mounts, and runc then fails ("no cgroup mount found in mountinfo"). Only in that
    case (no cgroup mount visible, and we are in a named network namespace) the hierarchies of
    /proc/self/cgroup are mounted again under /sys/fs/cgroup. The mounts live in that private
    namespace (slave of the host's): nothing changes outside it. Returns what was mounted."""
    with open("/proc/self/mountinfo") as f:
        if " - cgroup" in f.read():
            return []
    me = os.stat("/proc/self/ns/net")
    named = any(
        (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino)
        for st in (os.stat(os.path.join("/run/netns", n)) for n in _listdir("/run/netns"))
    )
    if not named:
        return []
    with open("/proc/self/cgroup") as f:
        lines = [line.strip().split(":", 2) for line in f if line.strip()]
    v1 = [ctrls for _, ctrls, _ in lines if ctrls]
    root = "/sys/fs/cgroup"
    if not v1:  # pure cgroup v2
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", root], check=True)
        return [root]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", root], check=True)
    done = [root]
    for ctrls in v1:
        name = ctrls.removeprefix("name=")
        opts = f"none,{ctrls}" if ctrls.startswith("name=") else ctrls
        os.makedirs(os.path.join(root, name), exist_ok=True)
        subprocess.run(
            ["mount", "-t", "cgroup", "-o", opts, "cgroup", f"{root}/{name}"], check=True
        )
        done.append(f"{root}/{name}")
    if any(not ctrls for _, ctrls, _ in lines):  # hybrid: cgroup2 too
        os.makedirs(f"{root}/unified", exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", f"{root}/unified"], check=False)
    return done


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


class ContainerInstance:
    def __init__(self, rt: ContainerRuntime, name: str, pid: int | None) -> None:
        self._rt, self.name, self.pid = rt, name, pid
        self._waiter: Child | None = None
        self.status: ExitStatus | None = None

    async def wait(self) -> ExitStatus:
        self._waiter = await spawn(
            [*self._rt.base, "wait", *self._rt.wait_args, self.name], stdout=PIPE, stderr=PIPE
        )
        out, _ = await self._waiter.communicate()
        text = out.decode().strip()
        if self._waiter.returncode != 0 or not text.lstrip("-").isdigit():
            # Gone before we could wait (removed by hand): report it as killed.
            self.status = ExitStatus(None, 9)
        else:
            self.status = ExitStatus.from_container_code(int(text))
        await self._rt.remove(self.name)
        return self.status

    async def signal(self, signum: int) -> None:
        if self.status is None:
            await self._rt.engine("kill", "--signal", str(signum), self.name, check=False)


class ContainerRuntime:
    name = "container"
    binary = "podman"
    wait_args: tuple[str, ...] = ()

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or self.binary
        self._cgroups_checked = False

    @property
    def base(self) -> list[str]:
        return [self.binary]

    def run_args(self, svc: ServiceConfig, log_dir: str = "") -> list[str]:
        c = svc.container
        assert c is not None
        args = ["run", "-d", "--name", svc.container_name, "--network", network(c.network)]
        args += ["--label", f"{LABEL}={svc.name}"]
        args += ["--ulimit", f"nofile={c.nofile}:{c.nofile}"]
        args += ["--ulimit", f"nproc={c.nproc}:{c.nproc}", "--stop-signal", svc.stop_signal]
        if log_dir:
            args += ["--log-driver", "k8s-file"]
            args += ["--log-opt", f"path={os.path.join(log_dir, svc.name + '.log')}"]
        env = dict(svc.env, NONSTOP_SERVICE=svc.name)
        if svc.state_volume:
            args += ["-v", f"{svc.state_volume}:{STATE_MOUNT}:rw"]
            env["NONSTOP_STATE_DIR"] = STATE_MOUNT
        for v in c.volumes:
            args += ["-v", v]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        if svc.user:
            args += ["--user", svc.user]
        if c.workdir:  # a path inside the container (svc.cwd is the host's, for processes)
            args += ["--workdir", c.workdir]
        return [*args, *c.extra_args, c.image, *svc.command]

    async def engine(self, *args: str, check: bool = True) -> str:
        proc = await spawn([*self.base, *args], stdout=PIPE, stderr=PIPE)
        out, err = await proc.communicate()
        if check and proc.returncode != 0:
            msg = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise LaunchError(f"{self.binary} {args[0]}: exit {proc.returncode}: {msg[0][:200]}")
        return out.decode().strip()

    async def remove(self, name: str) -> None:
        await self.engine("rm", "-f", "-t", "0", name, check=False)

    async def launch(self, svc: ServiceConfig, log_dir: str) -> ContainerInstance:
        if shutil.which(self.binary) is None:
            raise LaunchError(f"{self.binary} is not installed")
        if svc.state_volume:
            os.makedirs(svc.state_volume, exist_ok=True)
        if not self._cgroups_checked:
            self._cgroups_checked = True
            try:
                ensure_cgroup_mounts()
            except (OSError, subprocess.CalledProcessError) as e:
                raise LaunchError(f"cgroup hierarchies missing and not mountable: {e}") from e
        await self.remove(svc.container_name)
        os.makedirs(log_dir, exist_ok=True)
        await self.engine(*self.run_args(svc, log_dir))
        try:
            fmt = "{{.State.Pid}}"
            pid = int(await self.engine("inspect", "--format", fmt, svc.container_name))
        except (LaunchError, ValueError):
            pid = None  # already gone: wait() reports how it ended
        return ContainerInstance(self, svc.container_name, pid or None)

    async def cleanup(self, svc: ServiceConfig) -> None:
        await self.remove(svc.container_name)


class PodmanRuntime(ContainerRuntime):
    name = "podman"
    binary = "podman"
    # podman 4.3's wait polls the container state, every 250 ms by default: a death would be
    # seen that late. 20 ms cost 0.15 s of CPU in 6 s (~2.5 % of a CPU) per container here.
    wait_args = ("--interval", "20ms")

    def __init__(self, binary: str | None = None, oci_runtime: str = "runc") -> None:
        super().__init__(binary)
        self.oci_runtime = oci_runtime

    @property
    def base(self) -> list[str]:
        # --runtime is a global flag for podman, recorded with the container
        return [self.binary, "--runtime", self.oci_runtime]

    def run_args(self, svc: ServiceConfig, log_dir: str = "") -> list[str]:
        if svc.container is not None:
            self.oci_runtime = svc.container.oci_runtime
        return super().run_args(svc, log_dir)


class DockerRuntime(ContainerRuntime):
    name = "docker"
    binary = "docker"

    def run_args(self, svc: ServiceConfig, log_dir: str = "") -> list[str]:
        args = super().run_args(svc, log_dir)
        assert svc.container is not None
        return [args[0], "--runtime", svc.container.oci_runtime, *args[1:]]


def docker_unavailable() -> str | None:
    """Why docker cannot run containers here (None if it can)."""
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        return "the docker engine does not run on this machine (docker info: " + (
            (r.stderr.strip().splitlines() or ["no answer"])[-1][:120] + ")"
        )
    return None


def podman_unavailable() -> str | None:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        return "podman and runc are needed (scripts/setup.sh installs them)"
    r = subprocess.run(["podman", "--runtime", "runc", "info"], capture_output=True, timeout=60)
    return None if r.returncode == 0 else "podman info failed: " + r.stderr.decode()[-200:]


# ---- the local base image ----
def _libs(paths: list[str]) -> set[str]:
    found: set[str] = set()
    for p in paths:
        r = subprocess.run(["ldd", p], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            parts = line.split()
            for tok in parts:
                if tok.startswith("/") and os.path.exists(tok):
                    found.add(tok)
    return found


def _python_files() -> tuple[list[str], str]:
    """Files of this interpreter a service needs, and the interpreter's path."""
    exe = os.path.realpath(sys._base_executable)  # the venv's base python
    stdlib = sysconfig.get_paths()["stdlib"]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libpython = glob.glob(os.path.join(libdir, "libpython3*.so*"))
    import msgspec

    msgspec_dir = os.path.dirname(msgspec.__file__)
    sos = [exe, *libpython, *glob.glob(os.path.join(stdlib, "lib-dynload", "*.so"))]
    sos += glob.glob(os.path.join(msgspec_dir, "*.so"))
    return list(dict.fromkeys([exe, *libpython, stdlib, msgspec_dir, *sorted(_libs(sos))])), exe


_SKIP = {"test", "site-packages", "idlelib", "tkinter", "ensurepip", "lib2to3", "turtledemo"}


def build_rootfs_tar(dest: str) -> str:
    """Write the rootfs tarball; returns the interpreter path inside it (same as the host's)."""
    files, exe = _python_files()
    stdlib = sysconfig.get_paths()["stdlib"]
    import msgspec

    msgspec_dir = os.path.dirname(msgspec.__file__)

    def skip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        rel = os.path.relpath("/" + info.name, stdlib)
        top = rel.split(os.sep)[0]
        if not rel.startswith("..") and (top in _SKIP or top.startswith("config-")):
            return None
        return info

    with tarfile.open(dest, "w") as tar:
        for d in ("tmp", "state", "usr/bin", "etc"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(ti)
        for f in files:
            if f == msgspec_dir:
                arc = os.path.join(stdlib, "site-packages", "msgspec").lstrip("/")
                tar.add(f, arcname=arc)
            elif os.path.isdir(f):
                tar.add(f, arcname=f.lstrip("/"), filter=skip)
            else:  # shared libraries: follow symlinks (ld-linux is one)
                tar.add(os.path.realpath(f), arcname=f.lstrip("/"))
        link = tarfile.TarInfo("usr/bin/python3")
        link.type, link.linkname = tarfile.SYMTYPE, exe
        tar.addfile(link)
        passwd = b"root:x:0:0:root:/root:/nonexistent\nnobody:x:65534:65534::/:/nonexistent\n"
        ti = tarfile.TarInfo("etc/passwd")
        ti.size = len(passwd)
        import io

        tar.addfile(ti, io.BytesIO(passwd))
    return exe


def ensure_python_image(name: str = PYTHON_IMAGE, *, rebuild: bool = False) -> str:
    """Build the base image once (about 2 s, ~90 MB); later calls find it by name."""
    exists = subprocess.run(["podman", "image", "exists", name]).returncode == 0
    if exists and not rebuild:
        return name
    old = ""
    if exists:  # a rebuild would leave the old image untagged: remove it afterwards
        r = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", name],
                           capture_output=True, text=True)  # fmt: skip
        old = r.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="nonstop-rootfs-") as tmp:
        tar = os.path.join(tmp, "rootfs.tar")
        build_rootfs_tar(tar)
        r = subprocess.run(
            ["podman", "import", "-q", "--change", "CMD=/usr/bin/python3", tar, name],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise LaunchError(f"podman import failed: {r.stderr.strip()[-300:]}")
    if old:
        subprocess.run(["podman", "rmi", old], capture_output=True)  # fails if still in use
    return name


def remove_containers(binary: str = "podman") -> list[str]:
    """Remove every container a supervisor started (label nonstop.service); their names."""
    r = subprocess.run(
        [binary, "ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
    )
    names = r.stdout.split()
    if names:
        subprocess.run([binary, "rm", "-f", "-t", "0", *names], capture_output=True)
    return names


def remove_python_image(name: str = PYTHON_IMAGE) -> None:
    with contextlib.suppress(OSError):
        subprocess.run(["podman", "rmi", "-f", name], capture_output=True)
