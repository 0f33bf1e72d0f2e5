"""The medbank store: its layout and columns (the contract between `build` and the datasets).

    STORE/
      manifest.json   sources, counts by modality/task/split, licences, spec hash, tool version
      images/         Hugging Face `datasets` Arrow table: one row per stored image slice
      samples/        one row per (slice, label): a binary mask and references into images/

Images are stored once per slice and referenced by samples (a CT slice with 20 labelled organs is
one image row and 20 sample rows). Each sample names the image rows of its neighbouring slices,
`neighbors` = slices z-R..z+R of the same case (R = `clip_radius`, edge slices repeated at the ends
of a volume; a 2D image is its own neighbour), and the sample rows of the same label on those
slices, `neighbor_samples` (-1 where that slice has no mask of this label), so training can
assemble clips of T <= 2R+1 adjacent slices.

Images are stored after intensity preprocessing (CT windowed or clipped, MR percentile-clipped,
2D as is) as 8-bit PNG, grey (H, W) or RGB (H, W, 3); masks as 8-bit PNG 0/255.

`fov` (images/, optional): the field of view of the image, an 8-bit PNG 0/255 of the stored image's
size (255 inside, where pixels were acquired; 0 outside, e.g. the black corners of an ultrasound
fan or an endoscope's circle); None when the source gives none. Stores built before the column
existed lack it: a reader treats a missing column or None as "the whole image".

A case is the split unit: `case_id` = "<source>/<case>", or "<other source>/<case>" for a source
with `case_from: <other source>` (the two share case ids, so a subject is in one split across both),
or "<source>/<case>@<split>" for a source with `split_by: slab` (each volume cut into contiguous
slabs along the slicing axis, one per split; `num_slices` is then the slab's length, `slice_index`
still z in the volume, and neighbours stay inside the slab).

manifest.json `sources[]`: `cases` (unique case ids stored), `images` (source images or volumes
stored), `samples`, `skipped` (inputs skipped, with reasons in `skipped` at the top level).
"""

from __future__ import annotations

SCHEMA_VERSION = 1
IMAGES_DIR = "images"
SAMPLES_DIR = "samples"
MANIFEST = "manifest.json"
FOV = "fov"  # optional column of images/: the field of view (see above)


def image_features(fov: bool = False):
    """Columns of images/; `fov=True` adds the optional `fov` column (stores built with it)."""
    from datasets import Features, Image, Sequence, Value

    columns = Features(
        {
            "image": Image(),
            "dataset": Value("string"),
            "case_id": Value("string"),  # "<dataset>/<case>": unique across the store
            "slice_index": Value("int32"),  # z in the source volume; 0 for 2D
            "num_slices": Value("int32"),
            "spacing": Sequence(Value("float32"), length=3),  # (z, y, x) mm
            "original_size": Sequence(Value("int32"), length=2),  # (H, W) before any resize
            "split": Value("string"),
        }
    )
    if fov:
        columns["fov"] = Image()  # 0/255, None = the whole image is in the field of view
    return columns


def sample_features():
    """Columns of samples/."""
    from datasets import Features, Image, Sequence, Value

    return Features(
        {
            "mask": Image(),
            "image_row": Value("int64"),
            "neighbors": Sequence(Value("int64")),  # image rows, z-R..z+R
            "neighbor_samples": Sequence(Value("int64")),  # sample rows, -1 = no mask there
            "label": Value("string"),
            "label_id": Value("int32"),
            "modality": Value("string"),
            "task": Value("string"),
            "dataset": Value("string"),
            "case_id": Value("string"),
            "slice_index": Value("int32"),
            "mask_area": Value("int64"),  # foreground pixels
            "spacing": Sequence(Value("float32"), length=3),
            "original_size": Sequence(Value("int32"), length=2),
            "licence": Value("string"),
            "split": Value("string"),
        }
    )
