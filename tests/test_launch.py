"""launch/: the TPU VM and SLURM launchers, run through --dry-run (exact commands) and with fake tools on PATH."""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu_vm.sh"
GPU = REPO / "launch" / "gpu_slurm.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"

LOC = ["--zone=us-east5-a", "--project=my-proj"]
COMMON = ["--name=elm1", "--project=my-proj", "--zone=us-east5-a"]
QRS = ["gcloud", "compute", "tpus", "queued-resources"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]

INSTALL = (
    "set -e; rm -rf ~/ctelm_jax && tar -xzf ctelm_jax.tar.gz -C ~ && cd ~/ctelm_jax"
    " && if [ ! -x ~/ctelm_venv/bin/python ]; then python3 -m pip install -q --user uv"
    " && python3 -m uv venv --seed --python 3.12 ~/ctelm_venv; fi"
    " && ~/ctelm_venv/bin/python -m pip install -q -U pip"
    " && ~/ctelm_venv/bin/python -m pip install -q -e . 'jax[tpu]'"
    " -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
)


def train_command(args):
    inner = "cd ~/ctelm_jax && ~/ctelm_venv/bin/python -m ctelm_jax.train " + shlex.join(args)
    inner += "; echo $? > ~/ctelm_logs/train.rc"
    return (
        "mkdir -p ~/ctelm_logs && if [ -f ~/ctelm_logs/train.pid ] && [ ! -f ~/ctelm_logs/train.rc ]"
        " && kill -0 \"$(cat ~/ctelm_logs/train.pid)\" 2>/dev/null; then"
        " echo 'training already running' >&2; exit 1; fi; rm -f ~/ctelm_logs/train.rc;"
        f" setsid nohup bash -c {shlex.quote(inner)} >> ~/ctelm_logs/train.log 2>&1 < /dev/null &"
        " echo $! > ~/ctelm_logs/train.pid"
    )


def plus(*argv):
    return "+ " + shlex.join(argv)


def run(script, *args, env=None, check=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CTELM_", "SLURM_"))}
    full.update(env or {})
    argv = ["bash", str(script), *map(str, args)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=full, timeout=60)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def tmp_env(tmp_path):
    return {"TMPDIR": str(tmp_path)}


def test_create_v5p8_spot(tmp_env):
    out = run(TPU, "create", *COMMON, "--accelerator-type=v5p-8", "--spot", "--mesh", "data=2,fsdp=2,tensor=1",
              "--dry-run", env=tmp_env, check=0).stdout
    assert out.splitlines() == [
        plus(*QRS, "create", "elm1-qr", "--node-id=elm1", *LOC, "--accelerator-type=v5p-8",
             "--runtime-version=v2-alpha-tpuv5", "--spot"),
        plus(*QRS, "describe", "elm1-qr", *LOC, "--format=value(state.state)"),
    ]


@pytest.mark.parametrize("accel,runtime",
                         [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite")])
def test_create_on_demand_default_runtime(tmp_env, accel, runtime):
    out = run(TPU, "create", *COMMON, "--accelerator-type", accel, "--dry-run", env=tmp_env, check=0).stdout
    expected = plus(*VM, "create", "elm1", *LOC, f"--accelerator-type={accel}", f"--version={runtime}")
    assert out.splitlines() == [expected]


def test_create_runtime_override_and_env_project_zone(tmp_env):
    env = {**tmp_env, "CTELM_PROJECT": "p2", "CTELM_ZONE": "z2"}
    out = run(TPU, "create", "--name", "elm1", "--accelerator-type=v5litepod-8", "--runtime-version=rt-x",
              "--mesh", "8", "--dry-run", env=env, check=0).stdout
    assert out.splitlines() == [
        plus(*VM, "create", "elm1", "--zone=z2", "--project=p2", "--accelerator-type=v5litepod-8", "--version=rt-x")]


def test_setup(tmp_env):
    out = run(TPU, "setup", *COMMON, "--dry-run", env=tmp_env, check=0).stdout
    tarball = f"{tmp_env['TMPDIR']}/ctelm_jax-elm1.tar.gz"
    assert out.splitlines() == [
        plus("git", "-C", str(REPO), "archive", "--format=tar.gz", "--prefix=ctelm_jax/", "-o", tarball, "HEAD"),
        plus(*VM, "scp", tarball, "elm1:ctelm_jax.tar.gz", *LOC, "--worker=all"),
        plus(*VM, "ssh", "elm1", *LOC, "--worker=all", "--command=" + INSTALL),
    ]


TRAIN_ARGS = ["--config=configs/smoke.py", "--config.train.steps=100", "--config.name=it's a run"]


def test_train(tmp_env):
    out = run(TPU, "train", *COMMON, "--workdir", "gs://bkt/runs/a", "--dry-run", "--", *TRAIN_ARGS,
              env=tmp_env, check=0).stdout
    command = train_command(["--workdir=gs://bkt/runs/a", *TRAIN_ARGS])
    assert out.splitlines() == [plus(*VM, "ssh", "elm1", *LOC, "--worker=all", "--command=" + command)]


def test_logs_stop_delete(tmp_env):
    out = run(TPU, "logs", *COMMON, "--dry-run", env=tmp_env, check=0).stdout
    assert out.splitlines() == [
        plus(*VM, "ssh", "elm1", *LOC, "--worker=0", "--command=tail -n 100 -F ~/ctelm_logs/train.log")]
    out = run(TPU, "stop", *COMMON, "--dry-run", env=tmp_env, check=0).stdout
    assert len(out.splitlines()) == 1 and "--worker=all" in out and "kill -TERM" in out
    out = run(TPU, "delete", *COMMON, "--dry-run", env=tmp_env, check=0).stdout
    assert out.splitlines() == [plus(*VM, "delete", "elm1", *LOC, "--quiet")]
    out = run(TPU, "delete", *COMMON, "--spot", "--dry-run", env=tmp_env, check=0).stdout
    assert out.splitlines() == [plus(*QRS, "delete", "elm1-qr", *LOC, "--force", "--quiet")]


def test_resume_loop_dry_run_round(tmp_env):
    out = run(TPU, "resume-loop", *COMMON, "--accelerator-type=v5p-16", "--workdir=gs://b/r", "--dry-run",
              "--", "--config=configs/a.py", env=tmp_env, check=0).stdout
    lines = out.splitlines()
    describe = plus(*QRS, "describe", "elm1-qr", *LOC, "--format=value(state.state)")
    assert lines[:3] == [
        describe,
        plus(*QRS, "create", "elm1-qr", "--node-id=elm1", *LOC, "--accelerator-type=v5p-16",
             "--runtime-version=v2-alpha-tpuv5", "--spot"),
        describe,
    ]
    assert lines[3].startswith("+ git -C") and " scp " in lines[4]
    assert lines[5:] == [
        plus(*VM, "ssh", "elm1", *LOC, "--worker=all", "--command=" + INSTALL),
        plus(*VM, "ssh", "elm1", *LOC, "--worker=all",
             "--command=" + train_command(["--workdir=gs://b/r", "--config=configs/a.py"])),
    ]


@pytest.mark.parametrize("drop,flag", [("--project=my-proj", "--project"), ("--zone=us-east5-a", "--zone"),
                                       ("--name=elm1", "--name")])
def test_missing_required_flag(tmp_env, drop, flag):
    args = [a for a in COMMON if a != drop]
    proc = run(TPU, "delete", *args, "--dry-run", env=tmp_env, check=2)
    assert f"missing required flag {flag}" in proc.stderr and proc.stdout == ""


def test_mesh_mismatch_and_bad_accelerator(tmp_env):
    proc = run(TPU, "create", *COMMON, "--accelerator-type=v5p-8", "--mesh=data=8", "--dry-run", env=tmp_env, check=2)
    assert "8 devices" in proc.stderr and "4 chips" in proc.stderr and proc.stdout == ""
    proc = run(TPU, "create", *COMMON, "--accelerator-type=v4-8", "--mesh=data=2,fsdp=2,tensor=2", "--dry-run",
               env=tmp_env, check=2)
    assert "has 8 devices" in proc.stderr
    run(TPU, "create", *COMMON, "--accelerator-type=v5litepod-16", "--mesh=data=-1,tensor=4", "--dry-run",
        env=tmp_env, check=0)
    proc = run(TPU, "create", *COMMON, "--accelerator-type=v5litepod-16", "--mesh=data=-1,tensor=3", "--dry-run",
               env=tmp_env, check=2)
    assert "multiple of 3" in proc.stderr
    proc = run(TPU, "create", *COMMON, "--accelerator-type=v3-8", "--dry-run", env=tmp_env, check=2)
    assert "v5p-N" in proc.stderr


def test_bad_usage(tmp_env):
    proc = run(TPU, "explode", *COMMON, env=tmp_env, check=2)
    assert "unknown subcommand 'explode'" in proc.stderr and "usage:" in proc.stderr
    assert "usage:" in run(TPU, env=tmp_env, check=2).stderr
    assert "usage:" in run(TPU, "--help", env=tmp_env, check=0).stdout
    assert "unknown flag '--bogus'" in run(TPU, "stop", *COMMON, "--bogus", env=tmp_env, check=2).stderr
    proc = run(TPU, "train", *COMMON, "--workdir=/local/dir", "--dry-run", env=tmp_env, check=2)
    assert "gs://" in proc.stderr
    assert "--workdir" in run(TPU, "train", *COMMON, "--dry-run", env=tmp_env, check=2).stderr
    assert "--accelerator-type" in run(TPU, "create", *COMMON, "--dry-run", env=tmp_env, check=2).stderr


# ------------------------------------------------------------------ real mode with a fake gcloud on PATH

def fake_bin(tmp_path, name, body):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path.parent


def test_failure_after_create_prints_delete_command(tmp_path, tmp_env):
    log = tmp_path / "gcloud.log"
    bindir = fake_bin(tmp_path, "gcloud", f'echo "$*" >> {log}\n[[ $4 == describe ]] && echo FAILED\nexit 0\n')
    env = {**tmp_env, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = run(TPU, "create", *COMMON, "--accelerator-type=v5p-8", "--spot", env=env, check=1)
    assert "STILL RUNNING" in proc.stderr
    assert shlex.join([*QRS, "delete", "elm1-qr", *LOC, "--force", "--quiet"]) in proc.stderr
    assert log.read_text().splitlines()[0].startswith("compute tpus queued-resources create elm1-qr")


def test_failed_setup_step_names_slice(tmp_path, tmp_env):
    bindir = fake_bin(tmp_path, "gcloud", '[[ $4 == scp ]] && { echo "scp: boom" >&2; exit 7; }\nexit 0\n')
    env = {**tmp_env, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = run(TPU, "setup", *COMMON, env=env, check=7)
    assert "failed at: gcloud compute tpus tpu-vm scp" in proc.stderr
    assert shlex.join([*VM, "delete", "elm1", *LOC, "--quiet"]) in proc.stderr
    assert (tmp_path / "ctelm_jax-elm1.tar.gz").stat().st_size > 0  # git archive really ran


def test_no_banner_when_create_itself_fails(tmp_path, tmp_env):
    bindir = fake_bin(tmp_path, "gcloud", "exit 3\n")
    env = {**tmp_env, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = run(TPU, "create", *COMMON, "--accelerator-type=v4-8", env=env, check=3)
    assert "STILL RUNNING" not in proc.stderr


# ------------------------------------------- the remote commands, executed here with HOME as a fake worker

def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def remote_command(line):
    argv = shlex.split(line[2:])
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command="):]


def test_remote_setup_and_train_commands_run(tmp_path, tmp_env):
    home = tmp_path / "home"
    venv_py = home / "ctelm_venv" / "bin" / "python"
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > ~/py_args\n'
                       '[[ $1 != -m || $2 != ctelm_jax.train ]] || sleep "${FAKE_TRAIN_S:-0}"\n')
    venv_py.chmod(0o755)
    lines = run(TPU, "setup", *COMMON, "--dry-run", env=tmp_env, check=0).stdout.splitlines()
    subprocess.run(shlex.split(lines[0][2:]), check=True)  # git archive
    (home / "ctelm_jax.tar.gz").write_bytes(Path(shlex.split(lines[1][2:])[5]).read_bytes())  # scp
    env = {**os.environ, "HOME": str(home)}
    subprocess.run(["bash", "-c", remote_command(lines[2])], cwd=home, env=env, check=True, timeout=60)
    assert (home / "ctelm_jax" / "setup.py").exists()
    assert (home / "py_args").read_text().split("\n")[1:7] == ["-m", "pip", "install", "-q", "-e", "."]

    line = run(TPU, "train", *COMMON, "--workdir=gs://b/r", "--dry-run", "--", *TRAIN_ARGS,
               env=tmp_env, check=0).stdout.splitlines()[0]
    subprocess.run(["bash", "-c", remote_command(line)], cwd=home, env=env, check=True, timeout=60)
    rc = home / "ctelm_logs" / "train.rc"
    deadline = time.time() + 30
    while not rc.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert rc.read_text().strip() == "0"
    args = (home / "py_args").read_text().split("\n")
    assert args[0] == str(home / "ctelm_jax")
    assert args[1:-1] == ["-m", "ctelm_jax.train", "--workdir=gs://b/r", *TRAIN_ARGS]

    # A long run: a second start is refused; stop kills it (process group) and no rc is written.
    env["FAKE_TRAIN_S"] = "60"
    subprocess.run(["bash", "-c", remote_command(line)], cwd=home, env=env, check=True, timeout=60)
    again = subprocess.run(["bash", "-c", remote_command(line)], cwd=home, env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 1 and "already running" in again.stderr
    pid = int((home / "ctelm_logs" / "train.pid").read_text())
    stop = run(TPU, "stop", *COMMON, "--dry-run", env=tmp_env, check=0).stdout.splitlines()[0]
    subprocess.run(["bash", "-c", remote_command(stop)], cwd=home, env=env, check=True, timeout=60)
    deadline = time.time() + 10
    while alive(pid):  # (an unreaped zombie counts as gone: this sandbox's init may not reap)
        assert time.time() < deadline, "training process survived stop"
        time.sleep(0.1)
    assert not rc.exists() and not (home / "ctelm_logs" / "train.pid").exists()


# ------------------------------------------------------------------------------------------------ SLURM

def test_gpu_slurm_two_nodes():
    out = run(GPU, "--nodes", "2", "--gpus-per-node", "8", "--partition", "a100", "--workdir", "/shared/runs/x",
              "--dry-run", "--", "--config=configs/a.py", check=0).stdout
    assert out.splitlines() == [plus(
        "sbatch", "--job-name=ctelm", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=a100",
        f"--chdir={REPO}", f"--output={REPO}/slurm-%x-%j.out",
        "--export=ALL,CTELM_GPUS_PER_NODE=8,CTELM_INIT_TIMEOUT_S=300",
        str(SBATCH), "--workdir=/shared/runs/x", "--config=configs/a.py")]


def test_gpu_slurm_bad_input():
    proc = run(GPU, "--nodes", "2", "--dry-run", check=2)
    assert "missing required flag --partition" in proc.stderr and "missing required flag --workdir" in proc.stderr
    assert "--nodes" in run(GPU, "--nodes=0", "--partition=p", "--workdir=w", "--dry-run", check=2).stderr


TASK = 'export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"'


def slurm_env(tmp_path):
    bindir = fake_bin(tmp_path, "scontrol", '[[ "$1 $2 $3" == "show hostnames gpu[07-08]" ]] || exit 1\n'
                                            'printf "gpu07\\ngpu08\\n"\n')
    return {"PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4100", "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}


def test_sbatch_dry_run(tmp_path):
    out = run(SBATCH, "--dry-run", "--workdir=/w", "--config=configs/a.py", env=slurm_env(tmp_path), check=0).stdout
    assert out.splitlines() == [
        # port 61440 + 4100 % 4096: the one JAX's own SLURM detection picks
        "+ export JAX_COORDINATOR_ADDRESS=gpu07:61444",
        "+ export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
        "+ export CTELM_INIT_TIMEOUT_S=300",
        "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
        plus("srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c", TASK, "ctelm",
             "python", "-m", "ctelm_jax.train", "--workdir=/w", "--config=configs/a.py"),
    ]


def test_sbatch_runs_one_process_per_node_with_jax_env(tmp_path):
    # Fake srun: run the command once per task with srun's per-task variables; fake python dumps its env.
    env = slurm_env(tmp_path)
    fake_bin(tmp_path, "srun", 'while [[ $1 == --* ]]; do shift; done\nfor i in 0 1; do\n'
                               '  SLURM_NTASKS=2 SLURM_PROCID=$i "$@" || exit\ndone\n')
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    py = fake_bin(tmp_path, "fakepy", f'env | grep -E "^(JAX|CTELM|XLA_PYTHON)_" | sort > {out_dir}/$JAX_PROCESS_ID.env\n'
                                      f'printf "%s\\n" "$@" > {out_dir}/$JAX_PROCESS_ID.args\n') / "fakepy"
    env.update(CTELM_PYTHON=str(py), CTELM_GPUS_PER_NODE="4", CTELM_INIT_TIMEOUT_S="120")
    run(SBATCH, "--workdir=/w", "--config.name=a b", env=env, check=0)
    for i in (0, 1):
        lines = (out_dir / f"{i}.env").read_text().splitlines()
        assert f"JAX_PROCESS_ID={i}" in lines and "JAX_NUM_PROCESSES=2" in lines
        assert "JAX_COORDINATOR_ADDRESS=gpu07:61444" in lines and "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
        assert "CTELM_INIT_TIMEOUT_S=120" in lines and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in lines
        assert (out_dir / f"{i}.args").read_text().splitlines() == [
            "-m", "ctelm_jax.train", "--workdir=/w", "--config.name=a b"]


def test_sbatch_outside_slurm_fails():
    proc = run(SBATCH, "--dry-run", check=1)
    assert "SLURM" in proc.stderr


# --------------------------------------------------------------------- resume-loop against a scripted gcloud

FAKE_GCLOUD = r"""
echo "$*" >> "$FAKE/log"
pop() { head -n1 "$FAKE/$1"; sed -i 1d "$FAKE/$1"; }
if [[ $4 == describe ]]; then
  state=$(pop states)
  [[ $state != MISSING ]] || { echo "ERROR: (gcloud) NOT_FOUND: Resource not found" >&2; exit 1; }
  echo "$state"
elif [[ $4 == scp && -f $FAKE/scp_fails ]]; then
  rm "$FAKE/scp_fails"; exit 1
elif [[ $4 == ssh && $* == *--worker=0* ]]; then
  echo "some gcloud chatter"; pop statuses
fi
"""


def resume(tmp_path, tmp_env, states, statuses, scp_fails=False):
    fake = tmp_path / "fake"
    fake.mkdir()
    if scp_fails:
        (fake / "scp_fails").touch()
    (fake / "states").write_text("\n".join(states) + "\n")
    (fake / "statuses").write_text("\n".join(statuses) + "\n")
    bindir = fake_bin(tmp_path, "gcloud", FAKE_GCLOUD)
    env = {**tmp_env, "FAKE": str(fake), "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = run(TPU, "resume-loop", *COMMON, "--accelerator-type=v5p-8", "--workdir=gs://b/r", "--poll-interval=0",
               "--", "--config=configs/a.py", env=env)
    calls = [" ".join(c.split()[1:4]) for c in (fake / "log").read_text().splitlines()]
    return proc, calls


def test_resume_loop_recreates_after_preemption_and_stops_when_done(tmp_path, tmp_env):
    proc, calls = resume(tmp_path, tmp_env, ["SUSPENDED", "PROVISIONING", "ACTIVE", "ACTIVE", "ACTIVE"],
                         ["RUNNING", "EXITED 0"])
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "tpus queued-resources describe", "tpus queued-resources delete", "tpus queued-resources create",
        "tpus queued-resources describe", "tpus queued-resources describe",  # PROVISIONING, then ACTIVE
        "tpus tpu-vm scp", "tpus tpu-vm ssh", "tpus tpu-vm ssh",  # setup, train
        "tpus queued-resources describe", "tpus tpu-vm ssh",  # RUNNING
        "tpus queued-resources describe", "tpus tpu-vm ssh",  # EXITED 0
    ]
    assert "training finished" in proc.stderr


def test_resume_loop_starts_on_missing_and_gives_up_on_a_crash(tmp_path, tmp_env):
    proc, calls = resume(tmp_path, tmp_env, ["MISSING", "ACTIVE", "ACTIVE", "ACTIVE"], ["EXITED 1", "EXITED 1"])
    assert proc.returncode == 1
    assert calls[:2] == ["tpus queued-resources describe", "tpus queued-resources create"]
    assert calls[-4:] == ["tpus queued-resources describe", "tpus tpu-vm ssh"] * 2
    assert "training exited with 1" in proc.stderr and "STILL RUNNING" in proc.stderr


def test_resume_loop_retries_a_failed_setup(tmp_path, tmp_env):
    proc, calls = resume(tmp_path, tmp_env, ["MISSING", "ACTIVE", "ACTIVE", "ACTIVE"], ["NONE", "EXITED 0"],
                         scp_fails=True)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "tpus queued-resources describe", "tpus queued-resources create", "tpus queued-resources describe",
        "tpus tpu-vm scp",  # fails
        "tpus queued-resources describe", "tpus tpu-vm ssh",  # NONE
        "tpus tpu-vm scp", "tpus tpu-vm ssh", "tpus tpu-vm ssh",  # setup, train
        "tpus queued-resources describe", "tpus tpu-vm ssh",  # EXITED 0
    ]
    assert "1 of 5 retries" in proc.stderr
