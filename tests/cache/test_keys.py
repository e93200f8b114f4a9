import pytest
from redis.crc import key_slot

from cache.keys import RecordKey, record_key_prefix
from htcvlm.record import image_id_of

IMG = image_id_of(b"an image")


@pytest.mark.parametrize("prefix", ["onetoken", "onetoken-test-1a2b", "tenant.a"])
@pytest.mark.parametrize("fingerprint", ["tiny-3f9a0c", "paper_v2.1", "x"])
def test_str_round_trip(prefix: str, fingerprint: str) -> None:
    key = RecordKey(fingerprint, IMG)
    text = key.to_str(prefix)
    assert text == f"{prefix}:{fingerprint}:rec:{{{IMG}}}"
    assert RecordKey.parse(text, prefix) == key
    assert text.startswith(record_key_prefix(fingerprint, prefix))


def test_default_str_is_the_redis_key() -> None:
    assert str(RecordKey("m1", IMG)) == f"onetoken:m1:rec:{{{IMG}}}"
    assert RecordKey.parse(str(RecordKey("m1", IMG))) == RecordKey("m1", IMG)


@pytest.mark.parametrize("fingerprint", ["", "a:b", "a{b}", "a*", "with space", "x" * 129, "ünïcode"])
def test_rejects_fingerprints_that_would_break_keys(fingerprint: str) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        RecordKey(fingerprint, IMG)


@pytest.mark.parametrize("image_id", ["", IMG[:16], IMG.upper(), IMG + "0", "g" * 64])
def test_rejects_anything_but_a_full_sha256(image_id: str) -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        RecordKey("m1", image_id)


@pytest.mark.parametrize(
    "text",
    [
        f"other:m1:rec:{{{IMG}}}",
        f"onetoken:m1:meta:{{{IMG}}}",
        f"onetoken:m1:rec:{IMG}",
        f"onetoken:m1:rec:{{{IMG}}}:x",
        "onetoken:m1:rec:{}",
        "",
    ],
)
def test_parse_rejects_foreign_keys(text: str) -> None:
    with pytest.raises(ValueError):
        RecordKey.parse(text)


def test_cluster_slot_follows_the_image_not_the_model() -> None:
    # the hash tag is the image id: one image's keys share a slot across prefixes and models,
    # while one model's records spread over the cluster
    a = RecordKey("m1", IMG)
    assert key_slot(a.to_str().encode()) == key_slot(RecordKey("m2", IMG).to_str("other").encode())
    slots = {key_slot(str(RecordKey("m1", image_id_of(bytes([i])))).encode()) for i in range(64)}
    assert len(slots) > 50
