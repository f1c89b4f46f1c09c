"""The kernel cache loads only what no one else could have written (issue 13).

No test needs root: an entry is made to look like someone else's by replacing
``_build._trusted_uids`` (the uids the check accepts), and like root's by
making its real owner the one that function calls root. Anything that loads a
module runs in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import IMPORT_AND_REPORT, LAST_JSON, entries, needs_compiler, result_of, run_python

from roundpipe import _build

ME = os.geteuid()
STRANGERS = "frozenset({4242, 4243})"  # neither is this user nor the uid that owns the test's files

pytestmark = pytest.mark.usefixtures("cache")  # each test with an empty cache of its own


@pytest.fixture(scope="module")
def planted_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared library whose constructor writes the file named by $ROUNDPIPE_TEST_MARK."""
    cc = needs_compiler()
    d = tmp_path_factory.mktemp("planted")
    src = d / "planted.c"
    src.write_text(
        "#include <stdio.h>\n#include <stdlib.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        '    const char *mark = getenv("ROUNDPIPE_TEST_MARK");\n'
        '    FILE *f = mark ? fopen(mark, "w") : NULL;\n'
        '    if (f) { fputs("the planted constructor ran\\n", f); fclose(f); }\n'
        "}\n"
    )
    out = d / "planted.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Every name under root, symlinks' targets included, with its type, mode, owner, inode and
    content (lock files aside: taking a lock creates one)."""
    result = {}
    for path in sorted(root.rglob("*")):
        if path.name.endswith(".lock"):
            continue
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
            result.update(snapshot(path.resolve()) if path.is_dir() else {})
        else:
            content = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        result[str(path)] = (st.st_mode, st.st_uid, st.st_ino, content)
    return result


def copy_entry(built: Path, cache: Path) -> tuple[Path, dict]:
    shutil.copytree(built, cache)
    (entry,) = entries(cache)
    return entry, json.loads((entry / "meta.json").read_text())


def plant(entry: Path, meta: dict, so: Path) -> Path:
    """Replace the entry's artefact with so, and put so's sha256 in meta.json: the attack of issue 13."""
    artefact = entry / meta["artefact"]
    shutil.copyfile(so, artefact)
    meta = {**meta, "sha256": hashlib.sha256(so.read_bytes()).hexdigest()}
    (entry / "meta.json").write_text(json.dumps(meta))
    return artefact


def open_entry(entry: Path, owners: frozenset[int] | None = None) -> _build._Found | None:
    found = _build._open_entry(entry, entry.name, owners if owners is not None else _build._trusted_uids())
    if found is not None:
        os.close(found.fd)
    return found


# ---- the check, in this process (nothing is loaded) ---------------------------


def _foreign_owner(entry: Path, meta: dict, tmp: Path) -> None:
    pass  # made foreign by the owners passed to the check


def _group_writable_artefact(entry: Path, meta: dict, tmp: Path) -> None:
    os.chmod(entry / meta["artefact"], 0o775)


def _world_writable_dir(entry: Path, meta: dict, tmp: Path) -> None:
    os.chmod(entry, 0o777)


def _group_writable_meta(entry: Path, meta: dict, tmp: Path) -> None:
    os.chmod(entry / "meta.json", 0o664)


def _symlinked_artefact(entry: Path, meta: dict, tmp: Path) -> None:
    artefact = entry / meta["artefact"]
    target = tmp / "elsewhere.so"
    shutil.copy2(artefact, target)
    artefact.unlink()
    artefact.symlink_to(target)


def _symlinked_meta(entry: Path, meta: dict, tmp: Path) -> None:
    target = tmp / "elsewhere.json"
    shutil.copy2(entry / "meta.json", target)
    (entry / "meta.json").unlink()
    (entry / "meta.json").symlink_to(target)


def _symlinked_dir(entry: Path, meta: dict, tmp: Path) -> None:
    target = tmp / "elsewhere"
    shutil.move(str(entry), target)
    entry.symlink_to(target, target_is_directory=True)


UNTRUSTED = {  # how: (make it so, what the check must say)
    "foreign owner": (_foreign_owner, f"the directory is owned by uid {ME}"),
    "group-writable artefact": (_group_writable_artefact, "is writable by group"),
    "world-writable directory": (_world_writable_dir, "the directory is writable by group and others"),
    "group-writable meta.json": (_group_writable_meta, "meta.json is writable by group"),
    "symlinked artefact": (_symlinked_artefact, "is a symbolic link"),
    "symlinked meta.json": (_symlinked_meta, "meta.json is a symbolic link"),
    "symlinked entry directory": (_symlinked_dir, "the directory is a symbolic link"),
}


@pytest.mark.parametrize("how", list(UNTRUSTED))
def test_the_check_refuses_what_others_could_write_and_touches_nothing(how, built, cache, tmp_path):
    entry, meta = copy_entry(built, cache)
    assert open_entry(entry) is not None  # the copy as made: ours, 0755/0644, trusted
    make, says = UNTRUSTED[how]
    make(entry, meta, tmp_path)
    owners = frozenset({4242, 4243}) if how == "foreign owner" else None
    before = snapshot(cache)
    with pytest.raises(_build._Untrusted) as caught:
        open_entry(entry, owners)
    assert says in caught.value.describe(), caught.value.describe()
    assert caught.value.entry == entry and str(entry) in caught.value.describe()
    assert snapshot(cache) == before


def test_the_check_names_every_problem_and_the_owner():
    st = os.stat_result((stat.S_IFREG | 0o666, 0, 0, 1, 4242, 0, 0, 0, 0, 0))
    problems = _build._problems(st, "meta.json", frozenset({1, 2}), directory=False)
    assert len(problems) == 2 and problems[0].startswith("meta.json is owned by uid 4242"), problems
    assert problems[1] == "meta.json is writable by group and others"
    fifo = os.stat_result((stat.S_IFIFO | 0o644, 0, 0, 1, 1, 0, 0, 0, 0, 0))
    assert _build._problems(fifo, "x.so", frozenset({1}), directory=False) == ["x.so is not a regular file"]


def test_a_world_writable_sticky_root_is_fine(built, cache):
    """Like /tmp: others may add entries of their own, but cannot touch ours."""
    entry, _ = copy_entry(built, cache)
    os.chmod(cache, 0o1777)
    assert open_entry(entry) is not None


def test_new_entries_pass_the_check_whatever_the_umask(cache, tmp_path):
    """Under umask 002 the compiler makes 0775 files; the builder sets the modes itself."""
    needs_compiler()
    code = "import os\nos.umask(0o002)\n" + IMPORT_AND_REPORT + LAST_JSON
    result = result_of(run_python(code, timeout=180))
    assert result["native"] and not result["from_cache"] and result["warnings"] == []
    (entry,) = entries(cache)
    meta = json.loads((entry / "meta.json").read_text())
    modes = {p.name: stat.S_IMODE(os.lstat(p).st_mode) for p in (entry, entry / "meta.json", entry / meta["artefact"])}
    assert modes == {entry.name: 0o755, "meta.json": 0o644, meta["artefact"]: 0o755}
    assert open_entry(entry) is not None
    again = import_in_subprocess()
    assert again["native"] and again["from_cache"] and again["warnings"] == []


def test_the_lock_file_is_not_followed_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock = tmp_path / "key.lock"
    lock.symlink_to(victim)
    with pytest.raises(_build.BuildError, match="cannot open the build lock"), _build._FileLock(lock, timeout=1):
        pass
    assert victim.read_text() == "precious\n"


# ---- the whole path, in fresh interpreters -------------------------------------

# Imports roundpipe.optim, steps an Adam next to torch's fused one and reports. Warnings are
# left to Python's default filter, which prints each one to stderr once.
STEP_AND_REPORT = """
import json, os
import torch
import roundpipe.optim as rpo
from roundpipe import _build
gen = torch.Generator().manual_seed(0)
ps = [torch.randn(1000, generator=gen).requires_grad_() for _ in range(2)]
qs = [p.detach().clone().requires_grad_() for p in ps]
ours, torchs = rpo.Adam(ps, lr=1e-2), torch.optim.Adam(qs, lr=1e-2, fused=True)
for _ in range(3):
    for p, q in zip(ps, qs):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    ours.step()
    torchs.step()
result = {"native": rpo.native_available(), "from_cache": _build.INFO.from_cache,
          "artefact": _build.INFO.artefact, "private": _build.INFO.private_root,
          "root_exists": os.path.exists(_build.INFO.cache_root),
          "same_as_torch": all(torch.equal(p.view(torch.int32), q.view(torch.int32)) for p, q in zip(ps, qs))}
"""


def import_in_subprocess(prelude: str = "", env: dict[str, str] | None = None,
                         code: str = IMPORT_AND_REPORT) -> dict:
    proc = run_python(prelude + code + LAST_JSON, env=env, timeout=180)
    result = result_of(proc)
    result["stderr"] = proc.stderr
    return result


PLANTED = {  # how: (prelude in the importing process, a change to the entry, what the warning must say)
    "foreign owner": (f"import roundpipe._build as b\nb._trusted_uids = lambda: {STRANGERS}\n", None,
                      f"the directory is owned by uid {ME}"),
    "group-writable artefact": ("", _group_writable_artefact, "is writable by group"),
    "symlinked entry directory": ("", _symlinked_dir, "the directory is a symbolic link"),
}


@pytest.mark.parametrize("how", list(PLANTED))
def test_a_planted_module_never_runs_and_adam_still_steps_natively(how, built, cache, planted_so, tmp_path):
    entry, meta = copy_entry(built, cache)
    artefact = plant(entry, meta, planted_so)
    prelude, make, says = PLANTED[how]
    if make is not None:
        make(entry, meta, tmp_path)
    mark = tmp_path / "mark"
    before = snapshot(cache)
    result = import_in_subprocess(prelude, {"ROUNDPIPE_TEST_MARK": str(mark)}, STEP_AND_REPORT)
    assert not mark.exists(), "the planted module's constructor ran"
    assert result["native"] and result["private"] and not result["from_cache"]
    assert result["same_as_torch"]
    assert result["artefact"] != str(artefact) and not result["root_exists"]  # built privately, then deleted
    warning = " ".join(result["stderr"].split())
    assert "RuntimeWarning" in warning and f"not loading the kernel cache entry {entry}" in warning, warning
    assert says in warning and "left as is" in warning and "ROUNDPIPE_CACHE_DIR" in warning, warning
    assert warning.count("not loading the kernel cache entry") == 1, warning
    assert snapshot(cache) == before  # not deleted, moved or rebuilt
    assert list((tmp_path / "tmp").glob("roundpipe-*")) == []  # (torch's own step leaves torchinductor_*)


def test_the_planted_module_would_run_if_the_check_let_it(built, cache, planted_so, tmp_path):
    """The control for the test above: trusted (ours, 0755), the same plant runs at load time."""
    entry, meta = copy_entry(built, cache)
    plant(entry, meta, planted_so)
    mark = tmp_path / "mark"
    result = import_in_subprocess("", {"ROUNDPIPE_TEST_MARK": str(mark)})
    assert mark.exists(), "the planted constructor did not run when loaded: the test above proves nothing"
    assert result["native"] and not result["from_cache"]  # it did not load as a module: rebuilt in place


def test_a_read_only_cache_made_by_root_loads_for_everyone(built, cache):
    """A prebuilt cache in a container image: root's entries, read-only, in a sticky shared root."""
    entry, meta = copy_entry(built, cache)
    owner = os.lstat(entry).st_uid  # plays root; this process plays uid 4242
    for path in (entry / "meta.json", entry / meta["artefact"]):
        os.chmod(path, 0o444)
    os.chmod(entry, 0o555)
    os.chmod(cache, 0o1777)
    prelude = f"""
import roundpipe._build as b
b._trusted_uids = lambda: frozenset({{4242, {owner}}})
def refuse(*args, **kwargs):
    raise PermissionError(13, "read-only file system (simulated)")
b._unwritable = refuse
b._FileLock.__enter__ = refuse
b.tempfile.mkdtemp = refuse
"""
    try:
        result = import_in_subprocess(prelude)
    finally:
        os.chmod(entry, 0o755)
    assert result["native"] and result["from_cache"] and not result["private"], result
    assert result["artefact"] == str(entry / meta["artefact"])
    assert result["warnings"] == [] and result["stderr"] == ""


INFO = "import json\nfrom roundpipe.__main__ import main\nrc = main(['info'])\nresult = {'rc': rc}\n"


def info_rows(stdout: str) -> dict[str, str]:
    return {line[:14].strip(): line[14:].strip() for line in stdout.splitlines() if line[:14].strip()}


def test_info_says_whether_the_entry_in_use_is_trusted_and_why_not(built, cache):
    entry, _ = copy_entry(built, cache)
    proc = run_python(INFO + LAST_JSON, timeout=180)
    assert result_of(proc)["rc"] == 0, proc.stderr
    rows = info_rows(proc.stdout)
    assert rows["from cache"] == "yes" and rows["trusted"].startswith("yes: the cache entry, owned by uid"), rows

    os.chmod(entry, 0o775)
    proc = run_python(INFO + LAST_JSON, timeout=180)
    assert result_of(proc)["rc"] == 0, proc.stderr
    rows = info_rows(proc.stdout)
    assert rows["kernel"].startswith("native") and rows["from cache"].startswith("no")
    assert rows["trusted"].startswith(f"NO: the cache entry {entry}: the directory is writable by group"), rows
    assert "built privately" in rows["trusted"]
    assert proc.stderr == ""  # the "trusted" row replaces the warning


def test_build_refuses_an_untrusted_entry_and_leaves_it(built, cache):
    copy_entry(built, cache)
    before = snapshot(cache)
    code = (f"import roundpipe._build as b\nb._trusted_uids = lambda: {STRANGERS}\n"
            "import json\nfrom roundpipe.__main__ import main\nresult = {'rc': main(['build', '--force'])}\n")
    proc = run_python(code + LAST_JSON, timeout=180)
    assert result_of(proc)["rc"] == 1
    assert "not trusted" in proc.stderr and f"owned by uid {ME}" in proc.stderr, proc.stderr
    assert snapshot(cache) == before
