import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from replicate.data.imagenet import ILSVRC_FILES, class_names, ilsvrc_split, image_folder
from replicate.data.loader import DataConfig, prepare, source_split
from replicate.data.sources import MIRROR_DIR, DataError
from replicate.data.store import load_rgb
from tests.conftest import encode, needs_mirror, write_image_tree

# ILSVRC ids are not in sorted-wnid order in the devkit: the mapping must go through the wnid.
SYNSETS = [
    (1, "n03000000", 0),
    (2, "n01000000", 0),
    (3, "n02000000", 0),
    (4, "n00000001", 3),
]  # 4: not a leaf
SORTED = ["n01000000", "n02000000", "n03000000"]
VAL_IDS = [1, 2, 3, 3, 2, 1]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            add(tar, name, data)
    return out.getvalue()


def jpeg(value: int) -> bytes:
    return encode(np.full((20, 30, 3), value, np.uint8), quality=100)


def make_devkit(path: Path, year: int, ids: list[int]) -> None:
    fields = [(f"ILSVRC{year}_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(i, w, f"words {w}", c) for i, w, c in SYNSETS], dtype=fields)
    mat = io.BytesIO()
    savemat(mat, {"synsets": synsets})
    truth = "\n".join(map(str, ids)).encode()
    top = "ILSVRC2012_devkit_t12" if year == 2012 else "devkit-1.0"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, f"{top}/data/meta.mat", mat.getvalue())
        add(tar, f"{top}/data/ILSVRC{year}_validation_ground_truth.txt", truth)


def make_official(root: Path, year: int = 2012) -> None:
    files = ILSVRC_FILES[year]
    per_class = {
        wnid: tar_bytes({f"{wnid}_{i}.JPEG": jpeg(10 * k + i) for i in range(3)})
        for k, wnid in enumerate(SORTED)
    }
    (root / files["train"]).write_bytes(tar_bytes({f"{w}.tar": data for w, data in per_class.items()}))
    prefix = f"ILSVRC{year}_val_"
    (root / files["val"]).write_bytes(
        tar_bytes({f"{prefix}{i + 1:08d}.JPEG": jpeg(100 + i) for i in range(len(VAL_IDS))})
    )
    make_devkit(root / files["devkit"], year, VAL_IDS)


def test_official_2012_archives_are_read_in_place_with_sorted_wnid_labels(tmp_path):
    make_official(tmp_path)
    train = ilsvrc_split(tmp_path, "train")
    assert train.classes == SORTED
    assert [r.label for r in train.refs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Each ref reads back its own JPEG from inside the nested tar.
    assert [int(load_rgb(r.read(), r.name, 8, False).mean().round()) for r in train.refs[3:6]] == [10, 11, 12]
    val = ilsvrc_split(tmp_path, "val")
    # ids 1, 2, 3 are the wnids n03, n01, n02: sorted indices 2, 0, 1.
    assert [r.label for r in val.refs] == [2, 0, 1, 1, 0, 2]
    assert [int(load_rgb(r.read(), r.name, 8, False).mean().round()) for r in val.refs] == list(
        range(100, 106)
    )


def test_ilsvrc2010_test_labels_come_from_the_ground_truth_file(tmp_path):
    make_official(tmp_path, 2010)
    files = ILSVRC_FILES[2010]
    (tmp_path / files["test"]).write_bytes(
        tar_bytes({f"ILSVRC2010_test_{i:08d}.JPEG": jpeg(i) for i in (1, 2)})
    )
    with pytest.raises(DataError, match="ILSVRC2010_test_ground_truth.txt: not found"):
        ilsvrc_split(tmp_path, "test", 2010)
    (tmp_path / files["test_labels"]).write_text("3\n1\n")
    test = ilsvrc_split(tmp_path, "test", 2010)
    assert [r.label for r in test.refs] == [1, 2]


def test_mismatched_devkit_is_named(tmp_path):
    make_official(tmp_path)
    make_devkit(tmp_path / ILSVRC_FILES[2012]["devkit"], 2010, VAL_IDS)  # the 2010 devkit, renamed
    with pytest.raises(DataError, match="not the ILSVRC-2012 devkit"):
        ilsvrc_split(tmp_path, "val")
    make_devkit(tmp_path / ILSVRC_FILES[2012]["devkit"], 2012, VAL_IDS[:-1])
    with pytest.raises(DataError, match="6 images but 5 validation labels: mismatched devkit"):
        ilsvrc_split(tmp_path, "val")
    make_devkit(tmp_path / ILSVRC_FILES[2012]["devkit"], 2012, [1, 2, 3, 3, 2, 9])
    with pytest.raises(DataError, match="validation label 9 is not one of the devkit's 1000 classes"):
        ilsvrc_split(tmp_path, "val")


def test_missing_imagenet_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar.*image-net.org"):
        ilsvrc_split(tmp_path, "train")
    with pytest.raises(DataError, match="needs data.root"):
        source_split(DataConfig(dataset="ilsvrc2012"), "train")


def test_image_folder_labels_are_sorted_class_folders(tmp_path):
    write_image_tree(tmp_path, "train", {"n02": 2, "n01": 3})
    train = image_folder(tmp_path, "train")
    assert train.classes == ["n01", "n02"] and [r.label for r in train.refs] == [0, 0, 0, 1, 1]
    assert train.counts() == {"n01": 3, "n02": 2}


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing_class", "missing class folder .*val/n02"),
        ("empty_class", "val/n02: empty class folder"),
        ("flat", "val: no class folders.*holds images directly"),
        ("no_split", "val: not found"),
    ],
)
def test_image_folder_layout_errors_name_the_path(tmp_path, breakage, message):
    write_image_tree(tmp_path, "train", {"n01": 1, "n02": 1})
    if breakage == "missing_class":
        write_image_tree(tmp_path, "val", {"n01": 1})
    elif breakage == "empty_class":
        write_image_tree(tmp_path, "val", {"n01": 1})
        (tmp_path / "val" / "n02").mkdir()
    elif breakage == "flat":
        (tmp_path / "val").mkdir()
        (tmp_path / "val" / "x.JPEG").write_bytes(jpeg(1))
    with pytest.raises(DataError, match=message):
        image_folder(tmp_path, "val", image_folder(tmp_path, "train").classes)


def test_an_ilsvrc2012_tree_must_hold_the_1000_classes(tmp_path):
    if not MIRROR_DIR.is_dir():
        pytest.skip("needs the data mirror beside the checkout for the class list")
    write_image_tree(tmp_path, "train", {"n01440764": 1, "n99999999": 1})
    with pytest.raises(DataError, match="2 class folders, expected the 1000 ILSVRC-2012 wnids.*n99999999"):
        ilsvrc_split(tmp_path, "train")


@needs_mirror
def test_bundled_imagenette_has_the_documented_counts_and_classes():
    config = DataConfig()
    train = source_split(config, "train")
    val = source_split(config, "val", train.classes)
    assert len(train.refs) == 5000 and len(val.refs) == 1500
    assert set(train.counts().values()) == {500} and set(val.counts().values()) == {150}
    assert train.classes[0] == "n01440764" and train.classes[-1] == "n03888257"
    assert class_names(train.classes)[:3] == ["tench", "English springer", "cassette player"]


@needs_mirror
def test_every_bundled_full_size_photo_decodes_to_256(tmp_path):
    with tarfile.open(MIRROR_DIR / "imagenet-samples-200.tar") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        assert len(members) == 200
        for member in members:
            pixels = load_rgb(tar.extractfile(member).read(), member.name, 256, draft=True)
            assert pixels.shape == (256, 256, 3), member.name


def test_an_image_replaced_in_place_is_preprocessed_again(tmp_path):
    """An imagefolder's image overwritten under the same name: `prepare` makes a new store (its
    fingerprint dates and sizes the files), whose mean image sees the new pixels."""
    classes = {"n01": 2, "n02": 2}
    write_image_tree(tmp_path / "data", "train", classes, size=(300, 260))
    write_image_tree(tmp_path / "data", "val", classes, size=(300, 260), seed=1)
    config = DataConfig(dataset="imagefolder", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    before = prepare(config, workers=1)
    mean_before = before.stats["mean_image"].mean()
    replaced = tmp_path / "data" / "train" / "n01" / "n01_0.JPEG"
    replaced.write_bytes(encode(np.full((260, 300, 3), 255, np.uint8)))  # white, where noise was
    after = prepare(config, workers=1)
    assert after.train.folder != before.train.folder and after.eval.folder == before.eval.folder
    assert after.stats["mean_image"].mean() > mean_before + 20  # a quarter of the images now white
