"""
Reading a shared secret (the rendezvous' access key) from a file that only
its owner may read.  ``twistd natrendezvous --access-key-file`` and the
``punch:`` endpoints' ``accessKeyFile=`` read it the same way.
"""

from __future__ import annotations

import os
import stat

#: Largest key file read: a key, not a document.
MAX_KEY_FILE = 4096


def read_key_file(path: str) -> bytes:
    """
    The key in *path*: its content without surrounding whitespace (a
    trailing newline).

    :raises ValueError: saying what to do, when the file cannot be read, is
        not a regular file, other users may read or change it, or it is
        empty or larger than :data:`MAX_KEY_FILE`.
    """
    try:
        with open(os.path.expanduser(path), "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ValueError("not a regular file")
            if mode & 0o007:
                raise ValueError(
                    f"other users may read it (mode {stat.S_IMODE(mode):04o}); run chmod 600 "
                    f"{path}, and change the key if others may have read it"
                )
            content = file.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror}") from None
    if len(content) > MAX_KEY_FILE:
        raise ValueError(f"larger than {MAX_KEY_FILE} bytes; is it the key?")
    key = content.strip()
    if not key:
        raise ValueError("the file is empty")
    return key
