"""What users of other command-line tools expect of this one (issue 24): `-h`, `--version`, a way to name a file
that starts with '-', a help line for every default, and a server that restarts on the port it just left."""

from __future__ import annotations

import socket
from functools import partial

import pytest

from helpers_cli import run_headstart


# A bare environment and an 80-column terminal, as a user's shell may have.
_headstart = partial(run_headstart, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, columns=80, timeout=120)


def test_dash_h_is_help_and_version_prints_it() -> None:
    from headstart import __version__

    for args in (["-h"], ["train", "-h"], ["predict", "-h"]):
        proc = _headstart(*args)
        assert proc.returncode == 0 and "Usage: headstart" in proc.stdout, proc.stderr
    proc = _headstart("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"headstart {__version__}"


def test_a_file_named_with_a_leading_dash_gets_told_how(tmp_path) -> None:
    proc = _headstart("predict", str(tmp_path), "-leading-dash.jpg")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "-- -leading-dash.jpg" in proc.stderr and "./-leading-dash.jpg" in proc.stderr
    plain = _headstart("predict", str(tmp_path), "--bogus")  # an option mistyped, not a file: the usual pointer
    assert "--help" in plain.stderr and "./" not in plain.stderr


def test_out_says_its_default_without_a_stray_space() -> None:
    text = " ".join(_headstart("train", "--help", columns=200).stdout.split())
    assert "Directory to save the model in. [default: model, or the --resume folder]" in text


def test_a_port_left_in_time_wait_can_be_served_again() -> None:
    from headstart.cli.serve import check_port

    # A server that answered a client and stopped leaves the port in TIME_WAIT for about a minute.
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server's side closes first: its end of the connection waits in TIME_WAIT
    client.close()
    server.close()
    check_port("127.0.0.1", port)  # raised "Address already in use" before SO_REUSEADDR
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    from headstart.errors import ConfigError

    with pytest.raises(ConfigError, match="--port"):
        check_port("127.0.0.1", busy.getsockname()[1])
    busy.close()


def test_allow_host_adds_names_to_the_defaults() -> None:
    from headstart.cli.serve import _hosts

    assert _hosts("127.0.0.1", None) is None  # the service's own default ($HEADSTART_ALLOWED_HOSTS, else local)
    hosts = _hosts("127.0.0.1", ["Box.Example", " "])
    assert "box.example" in hosts and "127.0.0.1" in hosts and "localhost" in hosts and "" not in hosts
