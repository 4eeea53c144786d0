"""The moto S3 fixture itself: a put is readable back through s3fs."""
import pytest

pytestmark = [pytest.mark.s3, pytest.mark.timeout(60)]


def test_s3_roundtrip(s3_bucket, s3_storage_options):
    import fsspec

    fs = fsspec.filesystem("s3", **s3_storage_options)
    fs.pipe_file(f"{s3_bucket}/a/b.txt", b"hello")
    assert fs.cat_file(f"{s3_bucket}/a/b.txt") == b"hello"
    # create-once: a second exclusive create of the same key must fail
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{s3_bucket}/a/b.txt", b"again", mode="create")
    assert fs.cat_file(f"{s3_bucket}/a/b.txt") == b"hello"
