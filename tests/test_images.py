"Tests of spn4cir.images: de-duplication against a pixel-by-pixel comparison."
import numpy as np
from PIL import Image

from spn4cir.images import image_groups

def test_image_groups_against_pixel_comparison(tmp_path):
    rng = np.random.default_rng(0)
    bases = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in range(4)] + [np.zeros((5, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)]
    choice = rng.integers(0, len(bases), 25)
    paths = []
    for i, b in enumerate(choice):
        p = tmp_path/f"{i}.{['png', 'bmp', 'tif'][i % 3]}"; Image.fromarray(bases[b]).save(p); paths.append(p)
    groups = image_groups(paths, workers=2, progress=False)
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    for i in range(len(paths)):
        for j in range(len(paths)):
            same = pixels[i].shape == pixels[j].shape and (pixels[i] == pixels[j]).all()
            assert (groups[i] == groups[j]) == same
    first_seen = list(dict.fromkeys(groups.tolist()))
    assert first_seen == list(range(len(first_seen))) == sorted(set(groups.tolist()))   # dense, first-seen order
