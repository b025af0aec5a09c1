"""The persistent node id under state_dir."""

from __future__ import annotations

import threading
import uuid

import pytest

from rpicluster.identity import IdentityError, load_or_create_node_id


def test_created_once_then_kept(tmp_path):
    state = tmp_path / "state" / "nested"
    first = load_or_create_node_id(str(state))
    assert uuid.UUID(first).version == 4
    assert (state / "node_id").read_text() == first + "\n"
    assert load_or_create_node_id(str(state)) == first
    assert [p.name for p in state.iterdir()] == ["node_id"]  # no temporary file left


def test_two_nodes_get_different_ids(tmp_path):
    assert load_or_create_node_id(str(tmp_path / "a")) != load_or_create_node_id(
        str(tmp_path / "b")
    )


def test_concurrent_first_starts_agree_on_one_id(tmp_path):
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_or_create_node_id(str(tmp_path))))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert (tmp_path / "node_id").read_text().strip() == results[0]


def test_an_existing_id_is_kept_even_if_not_a_uuid(tmp_path):
    (tmp_path / "node_id").write_text("rpi-node-01-legacy\n")
    assert load_or_create_node_id(str(tmp_path)) == "rpi-node-01-legacy"


def test_a_corrupt_id_file_is_a_clear_error(tmp_path):
    (tmp_path / "node_id").write_text("two words\n")
    with pytest.raises(IdentityError, match="delete it to get a new id"):
        load_or_create_node_id(str(tmp_path))
    (tmp_path / "node_id").write_text("\n")
    with pytest.raises(IdentityError, match="not a node id"):
        load_or_create_node_id(str(tmp_path))


def test_an_unusable_state_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(IdentityError, match=f"state directory {blocker}/sub.*state_dir"):
        load_or_create_node_id(str(blocker / "sub"))
