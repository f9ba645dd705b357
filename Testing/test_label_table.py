"""The one MAISI label table (data/maisi_labels.json) and its lookups."""

from __future__ import annotations

import json

import pytest
from maisicore.anatomy import labels
from maisicore.anatomy.labels import Code, LabelInfo, label_dict, label_table

TUMOR_IDS = {23, 24, 26, 27, 128}


@pytest.fixture(scope="module")
def table():
    return label_table()


def test_ids_and_names_match_nvidia_label_dict(table, reference_dir):
    reference = json.loads((reference_dir / "label_dict.json").read_text())
    assert len(table) == 133
    assert {info.name: info.id for info in table} == reference
    assert label_dict() == reference
    assert [info.id for info in table] == sorted(reference.values())
    assert labels.valid_label_ids() == frozenset({0, *range(1, 133), 200})


def test_every_totalsegmentator_total_class_maps_to_exactly_one_label(table):
    ts = table.totalsegmentator_v2_names()
    assert len(ts) == 117 and sorted(ts) == list(range(1, 118))
    assert ts[1] == "spleen" and ts[2] == "kidney_right" and ts[117] == "costal_cartilages"
    owners: dict[str, list[int]] = {}
    for info in table:
        for name in info.totalsegmentator:
            owners.setdefault(name, []).append(info.id)
    for name in ts.values():
        assert len(owners.get(name, [])) == 1, name
        assert table.by_totalsegmentator(name).id == owners[name][0]


@pytest.mark.parametrize(
    ("ts_name", "label_id"),
    [
        ("liver", 1),
        ("kidney_left", 14),
        ("kidney_right", 5),
        ("vertebrae_L1", 37),
        ("urinary_bladder", 15),
        ("rib_right_12", 86),
        ("rib_left_1", 63),
        ("costal_cartilages", 114),
        ("iliac_vena_left", 60),
        ("kidney_cyst_left", 116),
        ("lung_upper_lobe_left", 28),
        ("liver_tumor", 26),
        ("liver_vessels", 25),
        ("lung_trachea_bronchia", 132),
        ("body_trunc", 200),
        ("body_extremities", 200),
    ],
)
def test_totalsegmentator_spot_checks(table, ts_name, label_id):
    assert table.by_totalsegmentator(ts_name).id == label_id


@pytest.mark.parametrize(
    "text", ["left kidney", "kidney_left", "Kidney, left", "KIDNEY LEFT", "kidney-left", " left   kidney "]
)
def test_left_kidney_spellings(table, text):
    assert table.by_segment_name(text).id == 14
    assert table.resolve(text).id == 14


@pytest.mark.parametrize(
    ("text", "label_id"),
    [
        ("right kidney", 5),
        ("Kidney, right", 5),
        ("bladder", 15),
        ("urinary bladder", 15),
        ("IVC", 7),
        ("L1 vertebra", 37),
        ("vertebrae L2", 36),
        ("left upper lobe of lung", 28),
        ("left lung upper lobe", 28),
        ("right lung upper lobe", 30),
        ("left lung lower lobe", 29),
        ("Rib right 12", 86),
        ("liver tumour", 26),
        ("whole body", 200),
    ],
)
def test_segment_names_and_synonyms(table, text, label_id):
    assert table.by_segment_name(text).id == label_id


def test_by_name_only_takes_maisi_names(table):
    assert table.by_name("Left_Kidney").id == 14
    assert table.by_name("dummy3").id == 18
    assert table.by_name("urinary bladder") is None  # a synonym, not the MAISI name
    assert table.by_segment_name("urinary bladder").id == 15


def test_unknown_lookups(table):
    assert table.by_name("pineal gland") is None
    assert table.by_segment_name("pineal gland") is None
    assert table.by_totalsegmentator("left kidney cortex") is None
    assert table.resolve("") is None
    assert table.by_terminology("ctx~SCT^123037004^Anatomical Structure~SCT^1^Nothing~^^~a~^^~^^") is None
    with pytest.raises(KeyError):
        table.by_id(0)
    with pytest.raises(KeyError):
        table.by_id(133)


def test_terminology_round_trip(table):
    coded = [info for info in table if info.category is not None]
    assert len(coded) == 133 - 8  # every label but the dummies
    for info in coded:
        entry = info.terminology_entry()
        assert entry.startswith("Segmentation category and type - DICOM master list~")
        assert len(entry.split("~")) == 7
        assert table.by_terminology(entry) is info
        assert table.resolve(entry) is info
    for info in table:
        if info.name.startswith("dummy"):
            assert info.terminology_entry() is None
            assert info.category is info.type is info.type_modifier is None


def test_terminology_entry_text(table):
    assert table.by_id(1).terminology_entry() == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
        "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    left_kidney = table.by_id(14)
    assert left_kidney.type == Code("SCT", "64033007", "Kidney")
    assert left_kidney.type_modifier == Code("SCT", "7771000", "Left")


def test_slicer_string_with_other_context_and_meanings(table):
    liver = (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    assert table.resolve(liver).id == 1
    kidney = (
        "My context~SCT^123037004^anatomical structure~SCT^64033007^Renal organ~SCT^7771000^Sinister"
        "~Other anatomy~^^~^^"
    )
    assert table.by_terminology(kidney).id == 14
    right = kidney.replace("7771000", "24028007")
    assert table.by_terminology(right).id == 5
    no_side = kidney.replace("SCT^7771000^Sinister", "^^")
    assert table.by_terminology(no_side) is None
    tumor = "x~SCT^49755003^Morph~SCT^108369006^Tumour~^^~y~SCT^15776009^Pancreatic structure~^^"
    assert table.by_terminology(tumor).id == 24
    cyst = "x~SCT^49755003^M~SCT^367643001^Cyst~^^~y~SCT^64033007^Kidney~SCT^24028007^Right"
    assert table.by_terminology(cyst).id == 117


def test_same_type_codes_do_not_collide(table):
    keys = {}
    for info in table:
        if info.category is None:
            continue
        key = info.terminology_entry().split("~")
        key = tuple(part.split("^")[1] for i, part in enumerate(key) if i not in (0, 4))
        assert key not in keys, (info.name, keys.get(key))
        keys[key] = info.name


def test_tumour_flags_and_codes(table):
    assert {info.id for info in table if info.tumor} == TUMOR_IDS
    regions = {23: "39607008", 24: "15776009", 26: "10200004", 27: "71854001", 128: "272673000"}
    for label_id, region in regions.items():
        info = table.by_id(label_id)
        assert info.category.value == "49755003"
        assert info.type.value == "108369006"
        assert info.anatomic_region.value == region
    body = table.by_id(200)
    assert (body.category.value, body.type.value) == ("123037004", "38266002")


def test_colours(table):
    for info in table:
        assert isinstance(info, LabelInfo)
        assert isinstance(info.color, tuple) and len(info.color) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in info.color)
    assert table.by_id(1).color == (40, 140, 40)
    assert len({info.color for info in table}) == len(table)


def test_existing_helpers_still_work():
    import numpy as np

    mask = np.zeros((4, 4, 4), dtype=np.int16)
    mask[0] = 28  # left lung upper lobe
    mask[1] = 1  # liver
    assert labels.body_region_from_mask(mask) == ("chest", "abdomen")
    mask[2] = 250
    assert labels.unknown_label_ids(mask) == [250]
