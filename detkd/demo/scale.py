"""The demo's scale: how much synthetic data, how many epochs and seeds, and the data-scale guard."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from detkd.errors import DetkdError

SCALE_FILE = "scale.json"  # beside the generated data: what it was generated with


@dataclass(frozen=True)
class DemoScale:
    """One demo scale. The teacher is trained once; the student, online and stored rows once per seed.

    The data fields are passed to ``detkd.data.synthetic.generate_synthetic`` (its defaults are
    today's data); the generator has no class-count or object-size options, so neither has the demo.
    """

    train_images: int
    val_images: int
    teacher_epochs: int
    student_epochs: int
    seeds: tuple[int, ...] = (0,)
    image_size: int = 128
    clutter: bool = True
    data_seed: int = 0

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"DemoScale.seeds: give one or more distinct seeds, got {self.seeds}")
        if min(self.train_images, self.val_images, self.teacher_epochs, self.student_epochs) < 1:
            raise ValueError(f"DemoScale: image counts and epochs must be >= 1, got {self}")

    def data_fields(self) -> dict:
        """What the generated data depends on (and nothing else: epochs and seeds can change over it)."""
        return {
            "train_images": self.train_images,
            "val_images": self.val_images,
            "image_size": self.image_size,
            "clutter": self.clutter,
            "data_seed": self.data_seed,
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds)}


# FULL is the scale `make demo` runs, retuned by measurement: 600 images, teacher 12 / students 6 epochs
# took 14 min 37 s on the idle 2-core machine (teacher 6.3 AP, student 3.2, online 6.4, stored 6.1);
# two thirds of the images and fewer epochs bring `make demo` on a fresh clone under 10 minutes.
FULL = DemoScale(train_images=400, val_images=150, teacher_epochs=8, student_epochs=5)
# QUICK only checks that the pipeline runs (tests use it): tiny data, one epoch.
QUICK = DemoScale(train_images=32, val_images=16, teacher_epochs=1, student_epochs=1)


def default_out(*, quick: bool) -> Path:
    """Separate default folders, so a quick run never reuses the full run's data and vice versa."""
    return Path("runs/demo-quick" if quick else "runs/demo")


def prepare_data(data: Path, scale: DemoScale) -> bool:
    """Generate the synthetic data into ``data`` unless it is there at this scale; True if generated.

    Refuses (DetkdError) data generated at another scale, or without a record of its scale: reusing
    it silently would make the table describe a run that never happened.
    """
    from detkd.data.synthetic import generate_synthetic

    wanted = scale.data_fields()
    record = data / SCALE_FILE
    if (data / "annotations" / "val.json").is_file():
        found = json.loads(record.read_text()) if record.is_file() else None
        if found == wanted:
            return False
        said = json.dumps(found) if found is not None else f"unknown (no {SCALE_FILE})"
        raise DetkdError(
            f"{data}: the demo's data there was generated at another scale: {said}; this run asks for "
            f"{json.dumps(wanted)}. Give another output folder (--out DIR) or delete {data}"
        )
    generate_synthetic(
        data,
        num_train=scale.train_images,
        num_val=scale.val_images,
        image_size=scale.image_size,
        seed=scale.data_seed,
        clutter=scale.clutter,
    )
    record.write_text(json.dumps(wanted, indent=2))  # last: an interrupted generation has no record
    return True
