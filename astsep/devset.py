"""Seeded dev mixtures with known references, built from the shared recordings (``../shared/data``).

Used to tune and benchmark the separator (``benchmarks/bench_quality.py``) and by tests. Nothing
here is copied into the repository: every mixture is made at run time from the shared files.

:func:`dev_mixtures` returns :class:`DevMixture` items of equal length (5 s at 16 kHz by default):

- ESC-50 pairs at 0 dB, and some at +5 / -5 dB (target energy relative to the interferer);
- read speech (LibriSpeech excerpts) with an ESC-50 sound, either one as the target;
- music (the librosa example set) with an ESC-50 sound, either one as the target.

Every item carries the AudioSet class id of its target and of its interferer, so an oracle guide
can name what it separates (:data:`ESC50_TO_AUDIOSET`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio import load_audio
from .config import SAMPLE_RATE
from .data.audiocaps import mix_at_snr
from .errors import ConfigError

# ESC-50 class → the AudioSet class that names the same sound (display names, resolved to ids
# through the 527-label list so a relabelled checkpoint still resolves them).
ESC50_TO_AUDIOSET: dict[str, str] = {
    "airplane": "Fixed-wing aircraft, airplane", "breathing": "Breathing", "brushing_teeth": "Toothbrush",
    "can_opening": "Liquid", "car_horn": "Vehicle horn, car horn, honking", "cat": "Cat", "chainsaw": "Chainsaw",
    "chirping_birds": "Chirp, tweet", "church_bells": "Church bell", "clapping": "Clapping",
    "clock_alarm": "Alarm clock", "clock_tick": "Tick-tock", "coughing": "Cough", "cow": "Cattle, bovinae",
    "crackling_fire": "Crackle", "crickets": "Cricket", "crow": "Crow", "crying_baby": "Baby cry, infant cry",
    "dog": "Dog", "door_wood_creaks": "Creak", "door_wood_knock": "Knock", "drinking_sipping": "Gurgling",
    "engine": "Engine", "fireworks": "Fireworks", "footsteps": "Walk, footsteps", "frog": "Frog",
    "glass_breaking": "Shatter", "hand_saw": "Sawing", "helicopter": "Helicopter", "hen": "Fowl",
    "insects": "Insect", "keyboard_typing": "Typing", "laughing": "Laughter", "mouse_click": "Clicking",
    "pig": "Pig", "pouring_water": "Pour", "rain": "Rain", "rooster": "Chicken, rooster", "sea_waves": "Waves, surf",
    "sheep": "Sheep", "siren": "Siren", "sneezing": "Sneeze", "snoring": "Snoring", "thunderstorm": "Thunderstorm",
    "toilet_flush": "Toilet flush", "train": "Train", "vacuum_cleaner": "Vacuum cleaner",
    "washing_machine": "Mechanisms", "water_drops": "Drip", "wind": "Wind",
}
# Every AudioSet class that fits an ESC-50 class (its own name in ESC50_TO_AUDIOSET first, then
# synonyms, the specific sounds it is made of, and its near parent; never a top-level class such as
# Animal, Vehicle or Music): what "a fitting label" means when a tagger's labels are scored.
ESC50_FITTING: dict[str, tuple[str, ...]] = {
    "airplane": ("Fixed-wing aircraft, airplane", "Aircraft", "Propeller, airscrew", "Aircraft engine", "Jet engine"),
    "breathing": ("Breathing", "Snort", "Gasp", "Pant", "Wheeze", "Snoring", "Sigh"),
    "brushing_teeth": ("Toothbrush", "Electric toothbrush"),
    "can_opening": ("Liquid", "Burst, pop", "Hiss", "Pour"),
    "car_horn": ("Vehicle horn, car horn, honking", "Car", "Air horn, truck horn", "Toot"),
    "cat": ("Cat", "Meow", "Purr", "Caterwaul", "Hiss"),
    "chainsaw": ("Chainsaw", "Power tool", "Tools"),
    "chirping_birds": ("Chirp, tweet", "Bird", "Bird vocalization, bird call, bird song"),
    "church_bells": ("Church bell", "Bell", "Change ringing (campanology)"),
    "clapping": ("Clapping", "Applause", "Hands"),
    "clock_alarm": ("Alarm clock", "Alarm", "Telephone bell ringing", "Buzzer", "Beep, bleep", "Ringtone"),
    "clock_tick": ("Tick-tock", "Tick", "Clock"),
    "coughing": ("Cough", "Throat clearing"),
    "cow": ("Cattle, bovinae", "Moo", "Livestock, farm animals, working animals"),
    "crackling_fire": ("Crackle", "Fire"),
    "crickets": ("Cricket", "Insect"),
    "crow": ("Crow", "Caw", "Bird", "Bird vocalization, bird call, bird song"),
    "crying_baby": ("Baby cry, infant cry", "Crying, sobbing", "Whimper"),
    "dog": ("Dog", "Bark", "Howl", "Bow-wow", "Growling", "Yip", "Whimper (dog)"),
    "door_wood_creaks": ("Creak", "Squeak", "Door"),
    "door_wood_knock": ("Knock", "Door", "Tap", "Wood"),
    "drinking_sipping": ("Gurgling", "Liquid", "Slosh", "Chewing, mastication"),
    "engine": ("Engine", "Idling", "Medium engine (mid frequency)", "Heavy engine (low frequency)",
               "Light engine (high frequency)", "Engine starting", "Motor vehicle (road)"),
    "fireworks": ("Fireworks", "Firecracker", "Explosion", "Burst, pop"),
    "footsteps": ("Walk, footsteps", "Run", "Shuffle"),
    "frog": ("Frog", "Croak"),
    "glass_breaking": ("Shatter", "Breaking", "Glass"),
    "hand_saw": ("Sawing", "Filing (rasp)", "Wood", "Tools"),
    "helicopter": ("Helicopter", "Aircraft"),
    "hen": ("Fowl", "Chicken, rooster", "Cluck"),
    "insects": ("Insect", "Fly, housefly", "Bee, wasp, etc.", "Buzz", "Mosquito"),
    "keyboard_typing": ("Typing", "Computer keyboard", "Typewriter"),
    "laughing": ("Laughter", "Giggle", "Chuckle, chortle", "Belly laugh", "Snicker", "Baby laughter"),
    "mouse_click": ("Clicking", "Tick", "Computer keyboard"),
    "pig": ("Pig", "Oink", "Grunt"),
    "pouring_water": ("Pour", "Water", "Liquid", "Trickle, dribble", "Splash, splatter", "Drip"),
    "rain": ("Rain", "Raindrop", "Rain on surface"),
    "rooster": ("Chicken, rooster", "Crowing, cock-a-doodle-doo", "Fowl"),
    "sea_waves": ("Waves, surf", "Ocean"),
    "sheep": ("Sheep", "Bleat", "Livestock, farm animals, working animals"),
    "siren": ("Siren", "Civil defense siren", "Police car (siren)", "Ambulance (siren)",
              "Fire engine, fire truck (siren)", "Emergency vehicle"),
    "sneezing": ("Sneeze",),
    "snoring": ("Snoring", "Breathing", "Snort"),
    "thunderstorm": ("Thunderstorm", "Thunder", "Rain"),
    "toilet_flush": ("Toilet flush", "Water"),
    "train": ("Train", "Rail transport", "Railroad car, train wagon", "Train wheels squealing", "Train horn"),
    "vacuum_cleaner": ("Vacuum cleaner",),
    "washing_machine": ("Mechanisms", "Engine", "Hum"),
    "water_drops": ("Drip", "Water", "Liquid", "Trickle, dribble"),
    "wind": ("Wind", "Wind noise (microphone)", "Rustle"),
}
SPEECH_LABEL = "Speech"
MUSIC_LABEL = "Music"
SPEECH_FITTING = ("Speech", "Male speech, man speaking", "Female speech, woman speaking", "Narration, monologue",
                  "Conversation", "Speech synthesizer")
MUSIC_FITTING = ("Music", "Musical instrument", "Piano", "Keyboard (musical)", "Trumpet", "Brass instrument", "Drum",
                 "Drum kit", "Bass guitar", "Orchestra", "Violin, fiddle", "Bowed string instrument",
                 "String section", "Classical music", "Waltz", "Ragtime", "Jazz", "Pop music", "Electronic music",
                 "Plucked string instrument", "Guitar", "Percussion", "Bass drum", "Snare drum", "Cymbal",
                 "Hi-hat", "Drum machine", "Synthesizer")


def fitting_labels(key: str, group: str) -> tuple[str, ...]:
    """The AudioSet display names that fit a sound of the class split (``key``: its ESC-50 class, or
    a speech / music recording; ``group``: ``esc50`` | ``speech`` | ``music``)."""
    if group == "speech":
        return SPEECH_FITTING
    if group == "music":
        return MUSIC_FITTING
    return ESC50_FITTING[key]
# librosa example recordings used as music (file name fragments)
MUSIC_FILES = ("sweet-waltz", "ragtime", "Hungarian_Dance", "Lets_Go_Fishin", "Sugar_Plum", "Vibe_Ace",
               "Drum-bass", "solo-trumpet")


@dataclass
class DevMixture:
    """One dev mixture: ``mixture = target + interferer``, each ``(N,)`` at 16 kHz."""

    name: str
    kind: str  # "esc50" | "speech" | "music"
    snr_db: float  # target energy relative to the interferer
    mixture: torch.Tensor
    target: torch.Tensor
    interferer: torch.Tensor
    target_label: str  # AudioSet display name
    interferer_label: str
    target_fitting: tuple[str, ...] = ()  # every AudioSet display name that fits the target (fitting_labels)
    interferer_fitting: tuple[str, ...] = ()


def _segment(x: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    y = x[start:start + n]
    return torch.nn.functional.pad(y, (0, n - y.numel())) if y.numel() < n else y


def dev_mixtures(shared_dir: str | Path, n_esc: int = 32, n_speech: int = 8, n_music: int = 8,
                 seconds: float = 5.0, seed: int = 0) -> list[DevMixture]:
    """Build the dev set (``n_esc + n_speech + n_music`` items; 48 by default), deterministic in ``seed``.

    Of the ESC-50 pairs, the first 5/8 are at 0 dB, then 3/16 at +5 dB and 3/16 at -5 dB.
    Speech and music items alternate between being the target and the interferer.
    """
    root = Path(shared_dir)
    esc_dir, lib_dir = root / "esc50_one_per_class", root / "librosa"
    esc_files = sorted(esc_dir.glob("*.flac"))
    if not esc_files or not lib_dir.is_dir():
        raise ConfigError(f"shared recordings not found under {root} (need esc50_one_per_class/ and librosa/)")
    n = int(round(seconds * SAMPLE_RATE))
    clips = {f.name.split("__")[0]: _segment(load_audio(f)[0], n) for f in esc_files}
    names = sorted(clips)
    rng = random.Random(seed)
    items: list[DevMixture] = []

    def add(kind: str, name: str, tgt: torch.Tensor, itf: torch.Tensor, snr: float, tl: str, il: str) -> None:
        mixture, target = mix_at_snr(tgt, itf, snr_db=snr, gain_db=0.0)
        items.append(DevMixture(f"{len(items):02d}_{name}", kind, snr, mixture, target, mixture - target, tl, il))

    n0 = round(n_esc * 5 / 8)
    n_plus = (n_esc - n0) // 2
    for i in range(n_esc):
        a, b = rng.sample(names, 2)
        snr = 0.0 if i < n0 else (5.0 if i < n0 + n_plus else -5.0)
        add("esc50", f"{a}+{b}@{snr:g}dB", clips[a], clips[b], snr, ESC50_TO_AUDIOSET[a], ESC50_TO_AUDIOSET[b])

    def excerpts(paths: list[Path], count: int, kind: str, label: str) -> None:
        audio = [load_audio(p)[0] for p in paths]
        for i in range(count):
            src = audio[i % len(audio)]
            start = int(rng.uniform(0, max(0.0, src.numel() / SAMPLE_RATE - seconds - 0.1)) * SAMPLE_RATE)
            seg = _segment(src, n, start)
            env = rng.choice(names)
            if i % 2 == 0:
                add(kind, f"{kind}+{env}", seg, clips[env], 0.0, label, ESC50_TO_AUDIOSET[env])
            else:
                add(kind, f"{env}+{kind}", clips[env], seg, 0.0, ESC50_TO_AUDIOSET[env], label)

    speech = sorted(lib_dir.glob("[0-9]*-*-0000.ogg"))
    music = sorted(p for p in lib_dir.glob("*.ogg") if any(k in p.name for k in MUSIC_FILES))
    if not speech or not music:
        raise ConfigError(f"speech or music recordings missing in {lib_dir}")
    excerpts(speech, n_speech, "speech", SPEECH_LABEL)
    excerpts(music, n_music, "music", MUSIC_LABEL)
    return items


def label_id(labels: list[str], name: str) -> int:
    """Index of the AudioSet display name ``name`` in ``labels`` (raises if absent)."""
    try:
        return labels.index(name)
    except ValueError:
        raise ConfigError(f"label {name!r} is not among the model's {len(labels)} labels") from None
