"""A tiny AudioLDM2 checkpoint of the real architectures, for tests and `make demo` (no Hub access needed).

`build_tiny_audio(out_dir)` writes an `AudioLDM2Pipeline` with all eleven components, random weights
(fixed seeds, so the bytes are the same on every run) and locally trained tokenizers, via
`save_pretrained`. The layout mirrors `cvssp/audioldm2` (see bench/model_configs/): same component
classes, and `model_index.json` names `GPT2Model` for `language_model`, like the real one, so the
loader's GPT2 workaround (transformers 5.x) is exercised. 16 kHz audio, 64 mel bins, hop 160.

    python -m tiny_models.audio OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SAMPLE_RATE_HERTZ = 16000
SEED = 1234

# The real checkpoint's model_index.json (cvssp/audioldm2). save_pretrained writes the classes of the
# objects it was given (e.g. transformers 5 has no separate *Fast tokenizer classes), so the file is
# rewritten with these after saving.
REAL_MODEL_INDEX_CLASSES = {
    "feature_extractor": ["transformers", "ClapFeatureExtractor"],
    "language_model": ["transformers", "GPT2Model"],
    "projection_model": ["audioldm2", "AudioLDM2ProjectionModel"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "ClapModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "RobertaTokenizerFast"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "unet": ["audioldm2", "AudioLDM2UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "vocoder": ["transformers", "SpeechT5HifiGan"],
}

# AudioCaps-style captions plus music and speech words, so that the tokenizers know the words our
# captions use (and the words they must avoid), and unknown words still split into byte-level pieces.
CORPUS = """
A dog barks while rain falls on a tin roof
Heavy rain drumming on a metal roof with thunder in the distance
Rain falls steadily on a window pane as wind blows
Light rain patters on leaves in a quiet forest
A dog barks repeatedly and growls at a stranger
A small dog yips and whines indoors
Several dogs bark in the distance while birds chirp
Footsteps crunch on gravel as a person walks slowly
Footsteps on a wooden floor creak in an empty hall
Heels click on a stone pavement in a busy street
A person runs through dry leaves crunching underfoot
A kettle whistles loudly as water boils on a stove
Water boils and bubbles in a metal pot in a kitchen
A wooden door creaks open slowly on rusty hinges
A heavy door slams shut and echoes in a hallway
A metal gate squeaks and clanks as it closes
Ocean waves crash on rocks and recede over sand
Waves break gently on a sandy beach with seagulls calling
Water flows in a stream over smooth stones
A faucet drips into a ceramic sink
Wind blows hard through tall trees and rustles the leaves
Birds chirp and sing in a park in the morning
A rooster crows on a farm at dawn
A cat meows and purrs on a soft couch
A horse gallops on a dirt road and neighs
A car engine starts and idles before driving away
Traffic passes on a wet road with tires hissing
A motorcycle revs its engine and speeds past
A train horn blows as a train rumbles over metal tracks
An airplane flies overhead with a loud roar
A helicopter hovers with blades chopping the air
A church bell rings several times in a town square
A clock ticks steadily in a quiet room
Glass bottles clink together on a wooden table
A glass shatters on a hard tile floor
Plates and cutlery clatter in a busy restaurant kitchen
Someone chops vegetables on a wooden cutting board
Bacon sizzles and crackles in a hot frying pan
A fire crackles and pops in a stone fireplace
Paper rustles as pages of a book are turned
Keys jingle on a metal ring
A zipper opens on a leather bag
Fabric rustles as clothes are folded
A person claps hands in a large echoing room
Hammer strikes a nail into wood repeatedly
A power drill whirs and grinds into concrete
A saw cuts through a plank of wood
Typing on a plastic keyboard in a quiet office
A phone vibrates on a glass table
Ice cubes rattle in a glass
A spoon stirs coffee in a ceramic mug
Hail pelts a car roof with sharp metallic taps
Thunder rumbles and cracks during a storm at night
Crickets chirp in a field at night
Frogs croak near a pond in the evening
A crowd murmurs in a large hall
Children play and shout in a playground
Leaves crunch under boots on a forest path
Snow crunches under heavy footsteps
A bicycle bell rings on a city street
A basketball bounces on a wooden court
A tennis ball is hit back and forth
A broom sweeps a dusty concrete floor
A vacuum cleaner hums across a carpet
An electric fan whirs steadily
A washing machine spins and rumbles
A bird flaps its wings and takes off
Bees buzz around flowers in a garden
A fountain splashes in a courtyard
Rainwater gurgles down a metal drain pipe
A boat motor hums on a calm lake
Oars splash in the water of a river
A whistle blows on a sports field
Ceramic dishes rattle in a cupboard
A cardboard box is torn open
Plastic bag crinkles and rustles
Coins drop onto a metal tray and clink
A wooden chair scrapes across a stone floor
A bell on a shop door jingles
Loud crash of metal pans falling on a tile floor
Soft tapping on a glass window
Sharp metallic clang echoing in a warehouse
Deep low rumble of distant thunder outdoors
Bright high pitched squeak of rubber on a gym floor
Dull thud of a heavy box dropped on carpet
Gentle splashing of water in a bathtub
Crisp crackling of dry twigs snapping
Hollow knocking on a wooden door
Muffled footsteps on a thick rug
Rhythmic clattering of a train on rails
Steady hiss of steam from a kettle spout
Rough scraping of a shovel on gravel
A man speaks and a woman laughs
A woman talks on the phone in a calm voice
People speaking in a crowded cafe
A person whispers quietly
Someone sings a song with a soft voice
A choir sings in a church
Music plays with a guitar and drums
A piano melody plays softly
An electric guitar strums a chord
A bass guitar plays a low groove
A drum kit plays a fast beat
A keyboard synthesizer plays a melody
Violin and cello play a slow harmony
An orchestra performs a symphony
Low quality distorted noisy recording with static hum and clipping
metal wood glass stone water plastic leather rubber ceramic paper fabric concrete gravel sand steel tin iron copper brass
loud soft quiet sharp dull bright deep hollow crisp muffled metallic rhythmic steady gentle harsh rough smooth resonant echoing
dripping tapping knocking creaking crunching splashing rustling whistling barking ringing buzzing humming roaring clanking
indoors outdoors at night in the morning in the distance nearby inside outside kitchen street forest beach city room
music melody song singing speech talking voice instrument guitar bass keyboard drums piano violin harmony chord
""".strip().splitlines()


def _train_roberta_tokenizer():
    """Byte-level BPE like roberta-base (CLAP's text tokenizer): <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizerFast(vocab=model["vocab"], merges=merges, model_max_length=512)


def _train_t5_tokenizer():
    """A unigram (sentencepiece-like) tokenizer like flan-t5's: <pad>=0 </s>=1 <unk>=2, '▁' word marks."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    # Single-threaded: the parallel trainer's scores (and the order of tied pieces) vary from run to run.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok.train_from_iterator(CORPUS, trainer=trainer)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    pieces = json.loads(tok.to_str())["model"]["vocab"]
    # Canonical order anyway: the three specials, then by score (rounded) and piece.
    specials, rest = pieces[:3], sorted(pieces[3:], key=lambda p: (-round(float(p[1]), 2), p[0]))
    vocab = [(piece, round(float(score), 2)) for piece, score in specials + rest]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=128)


def build_tiny_pipeline():
    """The tiny AudioLDM2Pipeline in memory (random weights, fixed seeds)."""
    import torch
    from diffusers import AudioLDM2Pipeline, AutoencoderKL, DDIMScheduler
    from diffusers.pipelines.audioldm2 import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
    from transformers import (
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        GPT2Config,
        GPT2Model,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = _train_roberta_tokenizer()
    tokenizer_2 = _train_t5_tokenizer()

    clap_dim, t5_dim, gpt2_dim, latent_channels, mel_bins = 16, 48, 32, 8, 64

    torch.manual_seed(SEED)
    text_encoder = ClapModel(
        ClapConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, projection_hidden_act="relu",
            ),
            audio_config=dict(
                spec_size=256, num_mel_bins=64, window_size=8, patch_size=4, patch_stride=[4, 4],
                depths=[1, 1], num_attention_heads=[2, 4], patch_embeds_hidden_size=16, hidden_size=32,
                enable_fusion=False, num_classes=8,
            ),
            projection_dim=clap_dim,
        )
    ).eval()

    torch.manual_seed(SEED + 1)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), d_model=t5_dim, d_kv=12, d_ff=64, num_layers=2, num_decoder_layers=2,
            num_heads=4, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, tie_word_embeddings=False,
        )
    ).eval()

    torch.manual_seed(SEED + 2)
    language_model = GPT2Model(
        GPT2Config(n_embd=gpt2_dim, n_layer=2, n_head=2, n_positions=256, vocab_size=64, max_new_tokens=8,
                   bos_token_id=63, eos_token_id=63)
    ).eval()

    torch.manual_seed(SEED + 3)
    projection_model = AudioLDM2ProjectionModel(
        text_encoder_dim=clap_dim, text_encoder_1_dim=t5_dim, langauge_model_dim=gpt2_dim
    ).eval()

    torch.manual_seed(SEED + 4)
    unet = AudioLDM2UNet2DConditionModel(
        sample_size=64,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=[[None, gpt2_dim, t5_dim]] * 4,
    ).eval()

    torch.manual_seed(SEED + 5)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.4110932946205139,
        force_upcast=True,
    ).eval()

    torch.manual_seed(SEED + 6)
    # initializer_range sets how loud random weights sound (measured on 2 s clips): 0.1 gives RMS 1e-4
    # (silence to the ear), 0.2 about 0.11 (audible noise, what `make demo` should play), 0.25+ clips.
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=mel_bins, sampling_rate=SAMPLE_RATE_HERTZ, upsample_initial_channel=32,
            upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
            resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
            initializer_range=0.2, normalize_before=False, leaky_relu_slope=0.1,
        )
    ).eval()

    # The real checkpoint's scheduler config (DDIM, as the seed ran it).
    scheduler = DDIMScheduler(
        beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )
    feature_extractor = ClapFeatureExtractor(
        feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10, fft_window_size=1024,
        frequency_min=50, frequency_max=14000, truncation="rand_trunc", padding="repeatpad",
    )
    return AudioLDM2Pipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        projection_model=projection_model,
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=feature_extractor,
        unet=unet,
        scheduler=scheduler,
        vocoder=vocoder,
    )


def build_tiny_audio(out_dir: Path | str) -> Path:
    """Writes the tiny checkpoint to `out_dir` (created if needed) and returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(out_dir, safe_serialization=True)

    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(REAL_MODEL_INDEX_CLASSES)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m tiny_models.audio OUT_DIR")
    print(build_tiny_audio(Path(argv[0])))


if __name__ == "__main__":
    main()
