"""The seed's file names (the scene mix: tests/unit/test_stereo_mix.py)."""
from orchestrator.naming import clip_file_name, safe_name


def test_file_names_are_safe_and_numbered_like_the_seed():
    assert clip_file_name(1, "Rain drops", "drumming on a tin roof!") == "01_rain_drops_drumming_on_a_tin_roof.wav"
    assert clip_file_name(12, "../../etc", "x/y\x00z") == "12_etc_x_y_z.wav"
    assert safe_name("Café  crème") == "cafe_creme"
    assert safe_name("***") == "sound"
    assert len(safe_name("a" * 200)) == 40
