#!/usr/bin/env python3
"""Installs a MySQL server from Debian's unstable archive into a directory of its own, for
the binlog relay's tests (`make mysql`). Debian's stable release ships MariaDB only; the
unstable one has MySQL, built against newer libraries than the machine's, so the server
and every library it needs (its C library too) are unpacked side by side, nothing is
installed system-wide, and the server runs through the unpacked dynamic loader.

Usage: install_mysql.py DEST

Writes DEST/root (the unpacked packages) and DEST/VERSION. Each package's SHA-256 is
checked against the archive's index, which is read over HTTPS.
"""

import hashlib
import lzma
import os
import subprocess
import sys
import tempfile
import urllib.request

MIRROR = "https://deb.debian.org/debian"
SUITE = "sid"
SERVER = "mysql-server-core"
# Packages a server run from its own directory does not need: scripts' interpreters,
# installation helpers, and data the tests do not read.
NOT_NEEDED = {
    "perl", "perl-base", "debconf", "libc-bin", "mysql-common", "adduser", "passwd",
    "init-system-helpers", "sensible-utils", "debianutils", "dpkg", "tzdata",
}


def fetch(url):
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def index():
    """The suite's packages: name to fields, and virtual name to a package providing it."""
    text = lzma.decompress(fetch(f"{MIRROR}/dists/{SUITE}/main/binary-amd64/Packages.xz"))
    packages, provided = {}, {}
    for stanza in text.decode("utf-8", "replace").split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        if "Package" not in fields:
            continue
        packages[fields["Package"]] = fields
        for virtual in fields.get("Provides", "").split(","):
            virtual = virtual.strip().split(" ")[0]
            if virtual:
                provided.setdefault(virtual, fields["Package"])
    return packages, provided


def closure(packages, provided, roots):
    """The packages `roots` need, following each dependency's first alternative."""
    wanted, seen, order = list(roots), set(), []
    while wanted:
        name = wanted.pop().split(":")[0]
        if name in NOT_NEEDED:
            continue
        name = name if name in packages else provided.get(name, name)
        if name in seen:
            continue
        if name not in packages:
            sys.exit(f"{SUITE} has no package {name}")
        seen.add(name)
        order.append(packages[name])
        for field in ("Pre-Depends", "Depends"):
            for dependency in packages[name].get(field, "").split(","):
                first = dependency.split("|")[0].strip().split(" ")[0]
                if first:
                    wanted.append(first)
    return order


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    dest = os.path.abspath(sys.argv[1])
    packages, provided = index()
    if SERVER not in packages:
        sys.exit(f"Debian {SUITE} has no {SERVER} now: the MySQL tests cannot run")
    needed = closure(packages, provided, [SERVER, "libssl3t64"])
    root = os.path.join(dest, "root")
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for package in needed:
            data = fetch(f"{MIRROR}/{package['Filename']}")
            if hashlib.sha256(data).hexdigest() != package["SHA256"]:
                sys.exit(f"{package['Filename']}: its SHA-256 does not match the index")
            deb = os.path.join(work, os.path.basename(package["Filename"]))
            with open(deb, "wb") as out:
                out.write(data)
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    version = packages[SERVER]["Version"]
    with open(os.path.join(dest, "VERSION"), "w") as out:
        out.write(version + "\n")
    print(f"MySQL {version} from Debian {SUITE} ({len(needed)} packages) in {root}")


if __name__ == "__main__":
    main()
