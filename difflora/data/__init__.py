"""Images in, tensors out: the first step of the data path.

- :mod:`~difflora.data.images`: the one image reader (every mode to RGB, bad files skipped and
  named), tensors, cover-and-crop.
- :mod:`~difflora.data.captions`: caption files, per-draw caption dropout and tag shuffling.
- :mod:`~difflora.data.buckets`: aspect-ratio buckets and the batch order that never mixes them.
- :mod:`~difflora.data.image_set`: :class:`ImageSet` / :class:`Example`, drawn as a pure function
  of ``(seed, example number)`` so a resumed run sees exactly the crops, flips and captions an
  uninterrupted run would have seen.
- :mod:`~difflora.data.sources`: folders (kohya's ``N_name`` sub-folders), masks, and
  :func:`load_training_images`, the loader every training job calls;
  :mod:`~difflora.data.hf_datasets`: ``--dataset_name`` through the ``datasets`` library.
"""

from difflora.data.buckets import Buckets, bucket_order
from difflora.data.captions import CaptionRules, read_caption, shuffle_tags
from difflora.data.image_set import Example, ImageSet
from difflora.data.images import (
    IMAGE_EXTENSIONS,
    UnreadableImage,
    cover_and_crop,
    find_images,
    load_image,
    read_image,
    read_images,
    resize_and_crop,
    to_tensor,
)
from difflora.data.sources import load_image_set, load_training_images, repeat_folder, scan_folder

__all__ = [
    "IMAGE_EXTENSIONS", "Buckets", "CaptionRules", "Example", "ImageSet", "UnreadableImage", "bucket_order",
    "cover_and_crop", "find_images", "load_image", "load_image_set", "load_training_images", "read_caption",
    "read_image", "read_images", "repeat_folder", "resize_and_crop", "scan_folder", "shuffle_tags", "to_tensor",
]
