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


_MODES_SCRIPT = r'''
import os, sys; os.umask(0o022)
from pathlib import Path
import torch, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from PIL import Image
from safetensors.torch import save_file
from spn4cir.core import append_jsonl, atomic_save, write_json, write_jsonl
from spn4cir.images import duplicate_groups, save_cached_features
from spn4cir.models import load_model, save_checkpoint
from spn4cir.positives import embed_images
from spn4cir.visualize import save_figure
d = Path(sys.argv[1]); model = load_model("spn-tiny-vit")
pics = {f"p{i}": d/"pics"/f"p{i}.png" for i in range(3)}; (d/"pics").mkdir()
for i, p in enumerate(pics.values()): Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(p)
save_checkpoint(model, d/"ckpt")                                                         # model.safetensors, config.json
atomic_save(d/"optimizer.safetensors", lambda tmp: save_file({"exp_avg": torch.zeros(3)}, tmp))   # optimizer state and banks
save_cached_features(d/"features.safetensors", torch.zeros(2, 3), "k")                   # an embedding cache
embed_images(model, pics, cache_dir=d/"embeddings", progress=False)                      # its safetensors and JSON, for real
duplicate_groups(pics, cache_dir=d/"groups", progress=False)                             # the de-duplication cache (JSON)
write_json(d/"report.json", {"a": 1}); write_jsonl(d/"history.jsonl", [{"a": 1}]); append_jsonl(d/"captions.jsonl", [{"a": 1}])
fig = plt.figure(); save_figure(fig, d/"curve.png")
'''

def test_every_kind_of_written_file_gets_the_umask_mode(tmp_path):
    "Under umask 022 every file a job writes is 0644: safetensors (model, optimizer, bank, embedding caches), JSON, JSONL, PNG."
    import subprocess, sys
    subprocess.run([sys.executable, "-c", _MODES_SCRIPT, str(tmp_path)], check=True, capture_output=True)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "pics" not in p.parts]
    kinds = {p.suffix for p in written}
    assert {".safetensors", ".json", ".jsonl", ".png"} <= kinds, kinds
    assert len([p for p in written if p.suffix == ".safetensors"]) >= 4
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o644" for p in written}
