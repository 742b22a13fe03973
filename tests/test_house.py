"""The layout's promises: a light loader import, the imports running one way, and the portable paths of the
plumbing (no pidfd_open, no copy_file_range: macOS) exercised here on Linux with those calls switched off."""

import ast
import os
import subprocess
import sys
import tempfile

import pytest
from conftest import ROOT

HEAVY = ("tqdm", "fcntl", "multiprocessing", "torch", "faiss", "concurrent", "ray", "transformers", "matplotlib")


def test_import_dbp_utils_loads_numpy_and_pygtrie_and_nothing_of_the_command_line():
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import dbp_utils"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    loaded = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert {"numpy", "pygtrie", "dbp_utils"} <= loaded
    assert not [name for name in loaded if name.split(".")[0] in HEAVY], sorted(loaded)


def imports_of(path: str) -> set[str]:
    """The project modules a file imports, anywhere in it (top-level names and dbpkit.<module>)."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "dbpkit":
                found |= {f"dbpkit.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("dbpkit", "dbp_utils") or os.path.exists(
        os.path.join(ROOT, f"{name}.py"))}


def test_imports_run_one_way_scripts_then_dbp_utils_then_the_package():
    package = os.path.join(ROOT, "dbpkit")
    scripts = [name[:-3] for name in os.listdir(ROOT) if name.endswith(".py") and name != "dbp_utils.py"]
    for name in os.listdir(package):
        if name.endswith(".py"):
            wrong = {i for i in imports_of(os.path.join(package, name)) if not i.startswith("dbpkit")}
            assert not wrong, f"dbpkit/{name} imports {wrong}"
            lines = open(os.path.join(package, name)).read().count("\n")
            assert lines <= 420, f"dbpkit/{name} has {lines} lines"
    assert not imports_of(os.path.join(ROOT, "dbp_utils.py")) & set(scripts)
    for script in scripts:
        assert not imports_of(os.path.join(ROOT, f"{script}.py")) & set(scripts), script


def test_numpy_writes_files_only_through_write_npy():
    """np.save (and tofile) cut a small array short on a full disk without an error: files.write_npy checks."""
    product = [os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")]
    product += [os.path.join(ROOT, "dbpkit", name) for name in os.listdir(os.path.join(ROOT, "dbpkit"))
                if name.endswith(".py") and name != "files.py"]
    for path in product:
        for node in ast.walk(ast.parse(open(path).read())):
            call = node.func if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            saves = call and call.attr in ("save", "savez", "savez_compressed") and \
                getattr(call.value, "id", "") in ("np", "numpy")
            assert not saves and not (call and call.attr in ("tofile", "open_memmap")), \
                f"{os.path.relpath(path, ROOT)}:{node.lineno} writes with numpy itself"


PORTABLE = """
import os, select, signal, subprocess, sys, time
for name in ("pidfd_open", "copy_file_range"):
    if hasattr(os, name):
        delattr(os, name)   # as on macOS
if hasattr(select, "kqueue"):
    delattr(select, "kqueue")
sys.path.insert(0, sys.argv[1])
from dbpkit import files, local_engine

# append_rest through shutil
with open(sys.argv[2], "wb") as f:
    f.write(b"head|" + bytes(range(256)) * 1000)
with open(sys.argv[2], "rb") as source, open(sys.argv[3], "wb") as out:
    out.write(b"before:")
    source.seek(5)
    files.append_rest(source, out)

# exit_with by looking: a forked process watches another, which ends when its stdin closes
watched = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
pid = os.fork()
if pid == 0:
    watched.stdin.close()   # (the fork's copy of the pipe: only the parent's keeps the watched process going)
    local_engine.exit_with(watched.pid)
    time.sleep(600)   # ended by the watch, never by this
    os._exit(3)
watched.stdin.close()   # the watched process ends
watched.wait()
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


def test_the_portable_paths_without_pidfd_open_kqueue_or_copy_file_range(tmp_path):
    r = subprocess.run([sys.executable, "-c", PORTABLE, ROOT, tmp_path / "source", tmp_path / "out"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"  # the watcher ended itself (os._exit(1)) once the watched process was gone
    assert (tmp_path / "out").read_bytes() == b"before:" + bytes(range(256)) * 1000


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="the kernel copy exists on Linux only")
def test_append_rest_by_the_kernel_gives_the_same_bytes():
    from dbpkit import files

    with tempfile.TemporaryDirectory() as folder:
        source, out = os.path.join(folder, "s"), os.path.join(folder, "o")
        with open(source, "wb") as f:
            f.write(b"xx" + os.urandom(300_000))
        with open(source, "rb") as s, open(out, "wb") as o:
            o.write(b"y")
            s.seek(2)
            files.append_rest(s, o)
        assert open(out, "rb").read() == b"y" + open(source, "rb").read()[2:]


def test_the_folder_lock_names_its_holder_refuses_a_second_and_leaves_no_file(tmp_path):
    from dbpkit.errors import UsageError
    from dbpkit.savedir import LOCK_FILE, FolderLock

    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text("pid 1 on elsewhere, started long ago: a killed run's line, longer than ours" * 20)
    held = FolderLock(str(tmp_path), "--save-dir").acquire()  # a killed holder's file: not held, so taken
    line = lock_file.read_text()
    assert line.startswith(f"pid {os.getpid()} on ") and "killed" not in line
    with pytest.raises(UsageError, match=f"--save-dir: {tmp_path} is in use by another run \\(pid {os.getpid()} on "):
        FolderLock(str(tmp_path), "--save-dir").acquire()  # another open of the file: refused at once
    held.release()
    assert os.listdir(tmp_path) == []
    FolderLock(str(tmp_path), "--save-dir").acquire().release()  # free again
    assert os.listdir(tmp_path) == []


def test_the_folder_lock_of_a_folder_removed_meanwhile_says_so(tmp_path):
    from dbpkit.errors import UsageError
    from dbpkit.savedir import FolderLock

    with pytest.raises(UsageError, match="gone was removed as this run started"):
        FolderLock(str(tmp_path / "gone"), "--save-dir").acquire()
    assert not (tmp_path / "gone").exists()
