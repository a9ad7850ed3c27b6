"""Checks of the installed CMake package (BUILD/prefix, made by tests/cpp/build.sh), as a consumer sees it.

- Only the public headers are installed; the library's RUNPATH is $ORIGIN (no paths of the build machine).
- find_package(pom_ext ...): version requests (0.1 and 0.1.0 found; 0.2, 1.0 and 0 refused), the CUDA component
  (refused with a message when the library has no CUDA kernels), an unknown component, a project whose torch is
  another version than the one pom_ext was built against (refused with a message); pom_ext_WITH_CUDA and
  pom_ext_TORCH_VERSION set.
- Linking pom_ext::pom_ext into a program that references no pom_ext symbol, with --as-needed for everything:
  the library stays a needed library (its ops register when it loads); the link line scopes --no-as-needed to it
  (push-state / pop-state) and has no bare --no-as-needed.

usage: python .ci/cpp_package_check.py BUILD
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

PUBLIC_HEADERS = {"export.h", "module.h", "ops.h", "pom_ext.h", "version.h"}


def fail(msg):
    print(f"cpp_package_check: FAIL: {msg}")
    sys.exit(1)


def configure(workdir, body, extra_args=()):
    """Configure a consumer project whose CMakeLists.txt is `body`; returns (returncode, output)."""
    src = os.path.join(workdir, "src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "CMakeLists.txt"), "w") as f:
        f.write("cmake_minimum_required(VERSION 3.18)\nproject(consumer LANGUAGES CXX)\n" + body)
    build = os.path.join(workdir, "build")
    shutil.rmtree(build, ignore_errors=True)
    r = subprocess.run(["cmake", "-S", src, "-B", build, *extra_args], capture_output=True, text=True)
    # CMake wraps messages across lines: one space between words, so the checks can match phrases.
    return r.returncode, " ".join((r.stdout + r.stderr).split())


def main(build):
    prefix = os.path.join(os.path.abspath(build), "prefix")
    torch_prefix = torch.utils.cmake_prefix_path
    prefix_path = f"-DCMAKE_PREFIX_PATH={prefix};{torch_prefix}"

    headers = set(os.listdir(os.path.join(prefix, "include", "pom_ext")))
    if headers != PUBLIC_HEADERS:
        fail(f"installed headers {sorted(headers)}, expected the public ones {sorted(PUBLIC_HEADERS)}")
    libdir = next(os.path.join(prefix, d) for d in ("lib", "lib64") if os.path.isdir(os.path.join(prefix, d)))
    lib = os.path.realpath(os.path.join(libdir, "libpom_ext.so"))
    dyn = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
    runpath = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.*)\]", dyn)
    if runpath != ["$ORIGIN"]:
        fail(f"RUNPATH of {lib} is {runpath}, expected ['$ORIGIN']")
    print(f"installed: public headers only, RUNPATH {runpath}")

    probe = ('message(STATUS "FOUND=${pom_ext_FOUND} WITH_CUDA=${pom_ext_WITH_CUDA} '
             'TORCH=${pom_ext_TORCH_VERSION} VERSION=${pom_ext_VERSION}")\n')
    with tempfile.TemporaryDirectory() as tmp:
        ok, out = configure(tmp, "find_package(pom_ext 0.1 REQUIRED)\n" + probe, [prefix_path])
        m = re.search(r"FOUND=(\S*) WITH_CUDA=(\S*) TORCH=(\S*) VERSION=(\S*)", out)
        if ok != 0 or not m or m.group(1) not in ("1", "TRUE"):
            fail(f"find_package(pom_ext 0.1 REQUIRED) failed:\n{out[-3000:]}")
        with_cuda, torch_version = m.group(2), m.group(3)
        if with_cuda not in ("ON", "OFF") or not torch_version:
            fail(f"pom_ext_WITH_CUDA={with_cuda!r} pom_ext_TORCH_VERSION={torch_version!r}")
        print(f"find_package(pom_ext 0.1): found, pom_ext_WITH_CUDA={with_cuda}, "
              f"pom_ext_TORCH_VERSION={torch_version}, version {m.group(4)}")

        for request, found in (("0.1.0", True), ("0.1...<0.2", True), ("0.2", False), ("1.0", False),
                               ("0", False)):
            ok, out = configure(tmp, f"find_package(pom_ext {request} QUIET)\n" + probe, [prefix_path])
            got = re.search(r"FOUND=(\S*)", out)
            is_found = ok == 0 and got is not None and got.group(1) in ("1", "TRUE")
            if is_found != found:
                fail(f"find_package(pom_ext {request}): found={is_found}, expected {found}:\n{out[-3000:]}")
        print("version requests: 0.1, 0.1.0 and 0.1...<0.2 found; 0.2, 1.0 and 0 refused")

        ok, out = configure(tmp, "find_package(pom_ext 0.1 REQUIRED COMPONENTS CUDA)\n" + probe, [prefix_path])
        if with_cuda == "OFF" and (ok == 0 or "without CUDA kernels" not in out):
            fail(f"COMPONENTS CUDA on a CPU-only build: exit {ok}, expected a refusal naming the reason:\n"
                 f"{out[-3000:]}")
        if with_cuda == "ON" and ok != 0:
            fail(f"COMPONENTS CUDA on a CUDA build failed:\n{out[-3000:]}")
        ok, out = configure(tmp, "find_package(pom_ext 0.1 REQUIRED COMPONENTS Python)\n", [prefix_path])
        if ok == 0 or "unknown component 'Python'" not in out:
            fail(f"an unknown component was not refused clearly:\n{out[-3000:]}")
        print(f"components: CUDA {'found' if with_cuda == 'ON' else 'refused (CPU-only build)'}, unknown refused")

        # A project that already found another torch (stood in for by a target named torch and its version).
        other = "add_library(torch INTERFACE IMPORTED)\nset(Torch_VERSION 1.0.0)\n"
        ok, out = configure(tmp, other + "find_package(pom_ext 0.1 REQUIRED)\n", [prefix_path])
        if ok == 0 or f"built against torch {torch_version}" not in out or "uses torch 1.0.0" not in out:
            fail(f"a project with another torch was not refused clearly:\n{out[-3000:]}")
        print("another torch: refused, naming both versions")

        # Linked with --as-needed for everything, a program that references no pom_ext symbol keeps the library.
        main_cpp = os.path.join(tmp, "src", "main.cpp")
        body = ('find_package(pom_ext 0.1 REQUIRED)\n'
                'add_executable(needs main.cpp)\n'
                'target_link_options(needs PRIVATE "LINKER:--as-needed")\n'
                'target_link_libraries(needs PRIVATE pom_ext::pom_ext)\n')
        os.makedirs(os.path.dirname(main_cpp), exist_ok=True)
        with open(main_cpp, "w") as f:
            f.write("#include <torch/torch.h>\nint main() { return torch::ones({1}).item<int>() == 1 ? 0 : 1; }\n")
        ok, out = configure(tmp, body, [prefix_path, "-DCMAKE_CXX_STANDARD=17"])
        if ok != 0:
            fail(f"configure of the --as-needed program failed:\n{out[-3000:]}")
        r = subprocess.run(["cmake", "--build", os.path.join(tmp, "build"), "--verbose"], capture_output=True,
                           text=True)
        if r.returncode != 0:
            fail(f"build of the --as-needed program failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        link = [line for line in r.stdout.splitlines() if " -o needs" in line]
        if not link:
            fail(f"no link line in the build output:\n{r.stdout[-3000:]}")
        flags = re.findall(r"-Wl,[^\s]*as-needed[^\s]*", link[0])
        # torch's own package scopes --no-as-needed to its libraries (-Wl,--no-as-needed,<libtorch_cpu>); a bare
        # -Wl,--no-as-needed would apply to everything after it.
        bare = [f for f in flags if f.rstrip(",") in ("-Wl,--no-as-needed", "-Wl,--push-state,--no-as-needed")]
        ours = [f for f in flags if "libpom_ext" in f]
        if bare or len(ours) != 1 or not ours[0].startswith("-Wl,--push-state,--no-as-needed,") or \
                not ours[0].endswith(",--pop-state"):
            fail(f"--no-as-needed is not scoped to libpom_ext: {flags}\n{link[0]}")
        needed = subprocess.run(["readelf", "-d", os.path.join(tmp, "build", "needs")], capture_output=True,
                                text=True, check=True).stdout
        if "libpom_ext.so" not in needed:
            fail(f"the --as-needed program does not need libpom_ext:\n{needed}")
        print("link: libpom_ext stays needed under --as-needed; --no-as-needed scoped to it")
    print("cpp_package_check passed")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
