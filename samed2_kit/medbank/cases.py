"""Read one case (image + labels) and cut it into slices and per-label binary masks.

Everything that can be wrong with one case raises ValueError with the file and the reason; the
build skips that case and reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samed2_kit.medbank.io.volume import Segment, Volume
from samed2_kit.medbank.layouts import CaseRef
from samed2_kit.medbank.spec import SourceSpec


@dataclass
class SlicedCase:
    """A case ready to store: 8-bit slices along the chosen axis and the masks to keep.

    images: (N, H, W) or (N, H, W, 3) uint8; spacing: (slice, row, col) mm.
    samples: (label_id, name, slice k, mask (H, W) bool) for every kept (label, slice).
    spacing_known: False when the source gave no pixel size (spacing is then 1 per pixel).
    fov: (N, H, W) bool aligned with `images`, True inside the field of view (pairs with a `fov`
        pattern); None: the whole image counts.
    """

    images: np.ndarray
    spacing: tuple[float, float, float]
    samples: list[tuple[int, str, int, np.ndarray]]
    spacing_known: bool = True
    fov: np.ndarray | None = None


def align_labels(labels: Volume, image: Volume, atol: float = 1e-2) -> Volume:
    """Put a label volume on the image's voxel grid when the two differ only by axis order or
    flips (the same grid stored another way); any other difference is a geometry mismatch."""
    if labels.shape_zyx == image.shape_zyx and np.allclose(labels.affine, image.affine, atol=atol):
        return labels
    src = labels.meta.get("source", "labels")
    img = image.meta.get("source", "image")
    m = np.linalg.solve(image.affine, labels.affine)  # label voxel (x,y,z) -> image voxel
    rot, t = m[:3, :3], m[:3, 3]
    perm = np.abs(rot).argmax(axis=1)
    ok = np.allclose(np.abs(rot).max(axis=1), 1, atol=1e-3) and sorted(perm) == [0, 1, 2]
    ok = ok and np.allclose(np.abs(rot).sum(axis=1), 1, atol=1e-3)
    if ok:
        xyz = labels.array.transpose(2, 1, 0).transpose(perm)  # label axes in image-axis order
        sign = np.sign(rot[np.arange(3), perm])
        n_img = image.shape_zyx[::-1]
        for i in range(3):
            want = 0.0 if sign[i] > 0 else n_img[i] - 1
            if abs(t[i] - want) > 0.05 or xyz.shape[i] != n_img[i]:
                ok = False
        if ok:
            for i in np.where(sign < 0)[0]:
                xyz = np.flip(xyz, axis=i)
            return Volume(
                np.ascontiguousarray(xyz.transpose(2, 1, 0)),
                image.spacing,
                image.affine,
                labels.meta,
            )
    raise ValueError(
        f"mask/image geometry mismatch: {src} is {labels.shape_zyx} (z, y, x) with origin "
        f"{np.round(labels.origin, 2).tolist()}, {img} is {image.shape_zyx} with origin "
        f"{np.round(image.origin, 2).tolist()}: resample the label map onto the image grid"
    )


def load_case(ref: CaseRef, src: SourceSpec, names: dict[int, str]) -> tuple[Volume, list[Segment]]:
    """The image volume and its segments (binary masks on the image grid).

    2D pairs (`ref.kind == "masks"`): each mask file is binarised by `src.mask_threshold`; an RGB
    mask whose channels differ is an error unless `src.mask_channel` picks a channel or
    `src.mask_colors` splits it into one segment per listed colour (label ids 1.. in the order
    listed). A field-of-view file (`ref.fov`) is read into `vol.meta["fov"]`, (1, H, W) bool.
    Items with `series_uid` read that series of a DICOM folder.
    """
    from samed2_kit.medbank.io import read_volume

    if ref.kind == "masks":
        vol, segs = _load_pair(ref, src)
    elif ref.kind == "labelmap":
        from samed2_kit.medbank.io.volume import segments_from_labelmap

        vol = read_volume(ref.image, series_uid=ref.series_uid)
        lab = align_labels(read_volume(ref.labels, labels=True), vol)
        segs = segments_from_labelmap(lab, names)
    else:
        from samed2_kit.medbank.io.dicom import read_dicom_series

        vol = read_dicom_series(ref.image, ref.series_uid)
        if ref.kind == "seg":
            from samed2_kit.medbank.io.dicom_seg import read_dicom_seg

            segs = read_dicom_seg(ref.labels, vol)
        else:
            from samed2_kit.medbank.io.rtstruct import read_rtstruct

            segs = read_rtstruct(ref.labels, vol)
    if vol.array.ndim == 3 and not np.all(np.isfinite(vol.array)):
        bad = int((~np.isfinite(vol.array)).sum())
        raise ValueError(f"{ref.image}: {bad} NaN/inf voxels; fix or mask them before building")
    if src.include is not None:
        segs = [s for s in segs if s.name in src.include]
    return vol, merge_same_names(segs)


def _same_size(path: str, arr: np.ndarray, what: str, ref: CaseRef, img: np.ndarray) -> None:
    if arr.shape[:2] != img.shape[:2]:
        raise ValueError(
            f"{what} {path} is {arr.shape[0]}x{arr.shape[1]} (HxW), image {ref.image} is "
            f"{img.shape[0]}x{img.shape[1]}: a pair must have one size"
        )


def _load_pair(ref: CaseRef, src: SourceSpec) -> tuple[Volume, list[Segment]]:
    """A 2D image as a one-slice volume, its masks as segments, its field of view in meta."""
    from samed2_kit.medbank.io.image import read_colour_masks, read_fov, read_image, read_mask

    img = read_image(ref.image)
    sy, sx = ref.spacing_yx or (1.0, 1.0)
    meta = {"source": ref.image, "spacing_known": ref.spacing_yx is not None}
    if ref.fov:
        fov = read_fov(ref.fov)
        _same_size(ref.fov, fov, "field-of-view mask", ref, img)
        meta["fov"] = fov[None]
    segs = []
    for label, path in ref.masks:
        if src.mask_colors:
            for name, m in read_colour_masks(path, src.mask_colors).items():
                _same_size(path, m, "mask", ref, img)
                ids = [n for n in src.mask_colors if n != "background"]
                segs.append(Segment(ids.index(name) + 1, name, m[None]))
            continue
        m = read_mask(path, src.mask_threshold, channel=src.mask_channel, on_colour="error")
        _same_size(path, m, "mask", ref, img)
        segs.append(Segment(len(segs) + 1, label, m[None]))
    return Volume(img[None], (1.0, sy, sx), meta=meta), segs


def merge_same_names(segs: list[Segment]) -> list[Segment]:
    """Segments that share a name become one object, the union of their masks under the first's
    id: a spec's `labels: {1: hippocampus, 2: hippocampus}` merges labels 1 and 2."""
    merged: dict[str, Segment] = {}
    for seg in segs:
        if seg.name in merged:
            first = merged[seg.name]
            merged[seg.name] = Segment(first.label_id, first.name, first.mask | seg.mask)
        else:
            merged[seg.name] = seg
    return list(merged.values())


def slice_case(vol: Volume, segs: list[Segment], src: SourceSpec, seed: int) -> SlicedCase:
    """Intensity to 8 bits, slice along `src.axis`, keep masks by the empty-slice rule."""
    from samed2_kit.medbank.preprocess import volume_to_uint8

    arr8 = volume_to_uint8(vol.array, src.modality, src.intensity)
    ax = src.axis
    images = np.moveaxis(arr8, ax, 0)
    sp = vol.spacing
    spacing = (sp[ax],) + tuple(s for i, s in enumerate(sp) if i != ax)
    rng = np.random.default_rng(seed)
    samples = []
    for seg in segs:
        masks = np.moveaxis(seg.mask, ax, 0)
        area = masks.reshape(len(masks), -1).sum(axis=1)
        present = np.where(area >= src.min_area)[0]
        if present.size == 0:
            continue
        keep = set(present.tolist())
        empty = [k for k in range(present.min(), present.max() + 1) if k not in keep]
        if empty and src.empty_keep_fraction > 0:
            n = int(round(src.empty_keep_fraction * len(empty)))
            keep.update(rng.choice(empty, size=n, replace=False).tolist())
        for k in sorted(keep):
            m = masks[k] if area[k] >= src.min_area else np.zeros_like(masks[k])
            samples.append((seg.label_id, seg.name, k, m))
    fov = vol.meta.get("fov")
    if fov is not None:
        fov = np.moveaxis(np.asarray(fov, bool), ax, 0)
    known = bool(vol.meta.get("spacing_known", True))
    return SlicedCase(images, spacing, samples, known, fov)
