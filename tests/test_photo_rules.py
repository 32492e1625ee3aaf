"""The photo-set rules shared by the upload and the frames stage."""
from __future__ import annotations

import pytest

from colmap_pipeline.core import photos
from colmap_pipeline.errors import PipelineError
from colmap_pipeline.intake import photo_files
from colmap_pipeline.photo_rules import (
    IMAGE_EXTENSIONS,
    MAX_PHOTOS,
    MIN_PHOTOS,
    check_count,
    natural_key,
)


def test_natural_order_compares_digits_as_numbers():
    names = ["img10.jpg", "IMG2.jpg", "img1.png"]
    assert sorted(names, key=natural_key) == ["img1.png", "IMG2.jpg", "img10.jpg"]


@pytest.mark.parametrize(("n", "code", "key"), [(2, "too_few_frames", "min_photos"),
                                                 (301, "invalid_request", "max_photos")])
def test_a_set_of_the_wrong_size_is_refused_with_its_numbers(n, code, key):
    with pytest.raises(PipelineError) as e:
        check_count(n)
    assert e.value.code == code
    assert e.value.details == {"photos": n, key: {2: MIN_PHOTOS, 301: MAX_PHOTOS}[n]}


def test_sizes_inside_the_limits_pass():
    assert (MIN_PHOTOS, MAX_PHOTOS) == (3, 300)
    check_count(MIN_PHOTOS)
    check_count(MAX_PHOTOS)


def test_the_upload_and_the_child_use_the_one_rule_set():
    """core/photos.py may not import the intake: both take the rules from this leaf."""
    assert photos.check_count is photo_files.check_count is check_count
    assert photos.natural_key is photo_files.natural_key is natural_key
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png")
