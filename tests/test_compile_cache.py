"""compile_cache: torch's compile cache goes to the node-local cache volume unless the user chose one."""
import pytest

from cogview_ray.compile_cache import INDUCTOR_ENV, use_node_compile_cache

pytestmark = [pytest.mark.timeout(30)]


def test_compile_cache_on_the_node_cache_volume(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIEW_RAY_CACHE", str(tmp_path / "volume"))
    env = {}
    assert use_node_compile_cache(env) == {INDUCTOR_ENV: str(tmp_path / "volume" / "compile" / "inductor")}
    assert env == {INDUCTOR_ENV: str(tmp_path / "volume" / "compile" / "inductor")}
    assert (tmp_path / "volume" / "compile" / "inductor").is_dir()


def test_compile_cache_chosen_by_the_user_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVIEW_RAY_CACHE", str(tmp_path / "volume"))
    env = {INDUCTOR_ENV: "/mine"}
    assert use_node_compile_cache(env) == {}
    assert env == {INDUCTOR_ENV: "/mine"} and not (tmp_path / "volume").exists()


def test_unwritable_cache_volume_leaves_torch_default(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("COGVIEW_RAY_CACHE", str(tmp_path / "file"))
    env = {}
    assert use_node_compile_cache(env) == {} and env == {}
