import functools
import hashlib
import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import pytest

from replicate.cifar.data import read_python_batches
from replicate.data import sources
from replicate.data.sources import DataError, Download, bundled_or_download, find_bundled, safe_extract
from tests.conftest import needs_mirror

BUNDLED = sources.MIRROR_DIR


@needs_mirror
def test_bundled_files_are_found_and_verified():
    assert find_bundled("ilsvrc2012-classes.tsv") == BUNDLED / "ilsvrc2012-classes.tsv"


def test_explicit_folder_comes_first_and_a_wrong_checksum_is_an_error(tmp_path):
    (tmp_path / "ilsvrc2012-classes.tsv").write_text("n00000001\tnot the real list\n")
    with pytest.raises(DataError, match=r"ilsvrc2012-classes.tsv: sha256 .* does not match"):
        find_bundled("ilsvrc2012-classes.tsv", tmp_path)


def test_missing_explicit_or_environment_folder_is_named(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data folder not found: .*nowhere"):
        find_bundled("ilsvrc2012-classes.tsv", tmp_path / "nowhere")
    monkeypatch.setenv("ALEXNET_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"\$ALEXNET_DATA names a folder that does not exist: .*gone"):
        find_bundled("ilsvrc2012-classes.tsv")


def make_tar(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, symlink
            tar.addfile(info)
    return path


def test_safe_extract_refuses_members_outside_the_folder(tmp_path):
    evil = make_tar(tmp_path / "evil.tar", {"../escaped.txt": b"x"})
    with pytest.raises(DataError, match="refusing unsafe member '../escaped.txt'"):
        safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()
    linked = make_tar(tmp_path / "link.tar", {"a.txt": b"a"}, symlink="/etc/passwd")
    with pytest.raises(DataError, match="refusing unsafe member 'link'"):
        safe_extract(linked, tmp_path / "out")
    assert not (tmp_path / "out.extracting").exists()  # a refused archive leaves nothing behind


def test_safe_extract_is_complete_or_absent(tmp_path):
    good = make_tar(tmp_path / "good.tar", {"d/a.txt": b"a", "d/b.txt": b"b"})
    out = safe_extract(good, tmp_path / "out")
    assert (out / "d" / "b.txt").read_bytes() == b"b" and (out / ".complete").is_file()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:700])
    with pytest.raises(DataError, match="truncated.tar: cannot extract"):
        safe_extract(truncated, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.extracting").exists()


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving a folder: the download path, without the network."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@needs_mirror
def test_download_verifies_md5_and_extracts(local_server, tmp_path, monkeypatch):
    served, url = local_server
    archive = served / "cifar-10-python.tar.gz"
    shutil.copy(BUNDLED / "cifar-10-subset-python.tar.gz", archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(sources, "MIRROR_DIR", tmp_path / "no-bundled-folder")
    monkeypatch.setitem(sources.OFFICIAL, "cifar10", Download(f"{url}/cifar-10-python.tar.gz", md5))
    folder, bundled = bundled_or_download("cifar-10-python.tar.gz", "cifar10", cache=tmp_path / "cache")
    assert not bundled
    images, labels = read_python_batches(folder / "cifar-10-batches-py", ["test_batch"], complete=False)
    assert images.shape == (1017, 32, 32, 3) and len(labels) == 1017
    assert (tmp_path / "cache" / "downloads" / "cifar-10-python.tar.gz").is_file()


@needs_mirror
def test_download_with_a_wrong_checksum_keeps_nothing(local_server, tmp_path, monkeypatch):
    served, url = local_server
    shutil.copy(BUNDLED / "ilsvrc2012-classes.tsv", served / "file.tgz")
    monkeypatch.setattr(sources, "MIRROR_DIR", tmp_path / "no-bundled-folder")
    monkeypatch.setitem(sources.OFFICIAL, "cifar10", Download(f"{url}/file.tgz", "0" * 32))
    with pytest.raises(DataError, match="md5 .* does not match the published 0000"):
        bundled_or_download("x", "cifar10", cache=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "downloads").iterdir())
    monkeypatch.setitem(sources.OFFICIAL, "cifar10", Download(f"{url}/absent.tgz", "0" * 32))
    with pytest.raises(DataError, match="download of .*absent.tgz failed"):
        bundled_or_download("x", "cifar10", cache=tmp_path / "cache")


def test_without_the_bundled_folder_imagenette_comes_from_the_official_archive(
    local_server, tmp_path, monkeypatch
):
    from replicate.data.loader import DataConfig, source_split
    from tests.conftest import write_image_tree

    served, url = local_server
    tree = tmp_path / "tree" / "imagenette2-320"
    write_image_tree(tree, "train", {"n01440764": 4, "n02102040": 3})
    write_image_tree(tree, "val", {"n01440764": 2, "n02102040": 2})
    archive = served / "imagenette2-320.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="imagenette2-320")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(sources, "MIRROR_DIR", tmp_path / "no-bundled-folder")
    monkeypatch.setitem(sources.OFFICIAL, "imagenette", Download(f"{url}/imagenette2-320.tgz", md5))
    config = DataConfig(cache_dir=str(tmp_path / "cache"))
    train = source_split(config, "train")
    assert train.classes == ["n01440764", "n02102040"] and len(train.refs) == 7
    assert len(source_split(config, "val", train.classes).refs) == 4


def test_with_no_copy_reachable_the_error_names_every_place_looked_and_how_to_point_at_one(
    local_server, tmp_path, monkeypatch
):
    _, url = local_server
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("ALEXNET_DATA", str(elsewhere))
    monkeypatch.setattr(sources, "MIRROR_DIR", tmp_path / "no-mirror")
    monkeypatch.setitem(sources.OFFICIAL, "cifar10", Download(f"{url}/absent.tgz", "0" * 32))
    with pytest.raises(DataError) as caught:
        bundled_or_download("cifar-10-jpeg.tar.gz", "cifar10", tmp_path, cache=tmp_path / "cache")
    message = str(caught.value)
    for place in (
        f"data.root: {tmp_path}",
        f"$ALEXNET_DATA: {elsewhere}",
        f"{tmp_path / 'no-mirror'} (absent)",
        "absent.tgz failed",
        "data.root=/that/folder",
        "ALEXNET_DATA=/that/folder",
    ):
        assert place in message, message


def test_downloads_and_their_checksums_are_torchvisions(tmp_path, monkeypatch):
    """The official archives, their md5 and the downloader are torchvision's own (datasets.Imagenette,
    datasets.CIFAR10, datasets.utils.download_url); only the safe extraction is this project's."""
    from torchvision import datasets

    assert sources.OFFICIAL["imagenette"] == Download(*datasets.Imagenette._ARCHIVES["320px"])
    assert sources.OFFICIAL["cifar10"] == Download(datasets.CIFAR10.url, datasets.CIFAR10.tgz_md5)
    fetched = []

    def download_url(url, root, filename, md5):
        fetched.append(url)
        (Path(root) / filename).write_bytes(b"archive")

    monkeypatch.setattr(datasets.utils, "download_url", download_url)  # what `download` imports
    md5 = hashlib.md5(b"archive").hexdigest()
    path = sources.download(Download("http://example.invalid/a.tgz", md5), tmp_path / "a.tgz")
    assert fetched == ["http://example.invalid/a.tgz"] and path.read_bytes() == b"archive"
    sources.download(Download("http://example.invalid/a.tgz", md5), tmp_path / "a.tgz")
    assert len(fetched) == 1  # a verified copy is not fetched again
