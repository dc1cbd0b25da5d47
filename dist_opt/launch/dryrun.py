"""``--dry-run``: the exact command and environment of every node, as shell lines; nothing starts."""

from __future__ import annotations

import shlex

from dist_opt.launch.envvars import is_secret
from dist_opt.launch.plan import Plan, SshOptions
from dist_opt.launch.ssh import remote_command, ssh_argv


def _env_words(env: dict[str, str]) -> list[str]:
    return [f"{k}={'<redacted>' if is_secret(k) else v}" for k, v in env.items()]


def render(plan: Plan, ssh: SshOptions, python: str, cwd: str) -> str:
    """One block per command: a comment naming the node, then ``env K=V ... ARGV`` (shell-quoted)."""
    lines = [
        f"# dist-opt launch --dry-run: launcher {plan.launcher}, {len(plan.procs)} command(s), "
        f"world size {plan.world_size}"
    ]
    lines += [f"# note: {n}" for n in plan.notes]
    for proc in plan.procs:
        where = "over ssh" if proc.remote else "on this machine (added to the launcher's environment)"
        lines.append(f"# {proc.label}: run {where}")
        lines.append(shlex.join(["env", *_env_words(proc.env), *proc.argv]))
        if proc.remote:
            assert proc.host is not None
            cmd = remote_command(python, cwd, proc.argv, pythonpath=proc.env.get("PYTHONPATH"))
            lines.append(f"#   via: {shlex.join(ssh_argv(proc.host, cmd, ssh))}")
            lines.append("#   (the environment is sent as JSON on ssh's stdin, not on a command line)")
            if proc.omp_ranks is not None:
                lines.append(f"#   OMP_NUM_THREADS: set on the node to its usable cores // {proc.omp_ranks}")
    return "\n".join(lines) + "\n"
