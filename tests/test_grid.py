from PIL import Image

from difflora.sampling import _wrap, make_grid


def test_labels_wrap_at_spaces_and_keep_every_word():
    text = "a small sks star on a pale pink background"
    lines = _wrap(text, 60, lambda s: 6 * len(s), 10)
    assert " ".join(lines) == text  # spaces kept, words whole
    assert all(6 * len(line) <= 60 for line in lines)
    assert _wrap("x" * 25, 60, lambda s: 6 * len(s), 10) == ["x" * 10, "x" * 10, "x" * 5]  # long word cut
    assert _wrap(text, 60, lambda s: 6 * len(s), 2)[-1].endswith("...")


def test_label_column_is_compact():
    rows = [[Image.new("RGB", (32, 32), "red")] * 4] * 2
    grid = make_grid(rows, ["a very long prompt " * 5, "b"], [f"seed {i}" for i in range(4)])
    cell = 96  # 32 px enlarged x3
    label_w = grid.width - 4 * cell
    assert 0 < label_w <= 1.5 * cell + 40
    # the label column holds text (dark pixels), the images start right after it
    assert grid.getpixel((label_w + 5, 14 + 5)) == (255, 0, 0)
    assert min(grid.crop((0, 14, label_w, 14 + cell)).convert("L").getdata()) < 100
