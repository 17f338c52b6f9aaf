"""The seed's prompt style, rebuilt for comparison only: the baseline of a seed-style benchmark run and
the contrast in tests/unit/test_prompts.py. Not a production option: it is a reconstruction of the
style (scene, mood, source and 100+ words of instructions; 150-180 words), not the seed's exact text, and
it breaks the project's rule that a caption fits CLAP's 77 tokens (docs/architecture.md "Models and testing
without their weights").
"""
from __future__ import annotations

from orchestrator.prompts import SoundVariant, clean_text


def seed_style_prompt(variant: SoundVariant, scene: str = "", mood: str = "") -> str:
    """One variant in the seed's style: scene, mood, source, action, timbre, then the instructions."""
    timbre = ", ".join(clean_text(t) for t in variant.timbre if clean_text(t)) or "natural"
    return (
        f"Scene description: {clean_text(scene)}. "
        f"Mood of the scene: {clean_text(mood)}. "
        f"Sound source: {clean_text(variant.name)}, made of {clean_text(variant.material) or 'an unknown material'}. "
        f"Play method: {clean_text(variant.action)}. "
        f"Timbre characteristics: {timbre}. "
        "Please generate a realistic, high-quality, natural sound effect that this specific object would produce "
        "in the scene described above, when it is played or used in the way described by the play method, "
        "and make sure that the timbre of the generated sound clearly reflects the listed characteristics. "
        "The sound should be clean, clear and well recorded, as if captured with a professional microphone at "
        "a close distance, with natural reverberation that matches the size and the materials of the "
        "surrounding environment, and with a believable attack, sustain and decay for this kind of object. "
        "Do not include any background music, melodies, singing, human speech or talking, and avoid any "
        "artificial, synthetic, distorted or low-quality artifacts, so that the resulting audio can later be "
        "used as a sample for a musical instrument in a music production pipeline."
    )
