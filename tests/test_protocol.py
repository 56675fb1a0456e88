import pytest

from benchmarks.core.protocol import apply_overrides, available_protocols, load_protocol, parse_assignments
from benchmarks.errors import BenchError

MINIMAL = """
name = "tiny"
dataset = "synthetic"
model = "tiny-cnn"
epochs = 2
batch_size = 32
budget = "epochs"
optimizer = "sgd"
lr = 0.1
schedule = "constant"
"""


def write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return str(path)


def test_every_shipped_protocol_loads():
    names = available_protocols()
    assert {"smoke", "fashion-mnist", "cifar10", "cifar100", "cifar10-fast", "imagenet"} <= set(names)
    for name in names:
        assert load_protocol(name).name == name


def test_paper_protocols_match_the_papers():
    cifar = load_protocol("cifar10")
    assert (cifar.model, cifar.epochs, cifar.batch_size, cifar.lr, cifar.weight_decay) == \
        ("resnet18-cifar", 200, 128, 0.1, 5e-4)
    assert cifar.nesterov and cifar.milestones == [60, 120, 160] and cifar.gamma == 0.2
    assert load_protocol("imagenet").model == "timm:resnet50"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL + 'epochz = 3\n')
    with pytest.raises(BenchError, match=r"p\.toml.*unknown key 'epochz'"):
        load_protocol(path)


def test_missing_key_names_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL.replace('budget = "epochs"\n', ""))
    with pytest.raises(BenchError, match=r"p\.toml.*missing key 'budget'"):
        load_protocol(path)


@pytest.mark.parametrize("line, key", [
    ('epochs = "two"', "epochs"), ("epochs = 0", "epochs"), ('budget = "steps"', "budget"),
    ("lr = -1.0", "lr"), ('augment = ["rotate"]', "augment"), ("label_smoothing = 1.5", "label_smoothing"),
])
def test_bad_values_name_the_key(tmp_path, line, key):
    key_name = line.split(" = ")[0]
    text = "\n".join(ln for ln in MINIMAL.splitlines() if not ln.startswith(key_name + " ")) + "\n" + line + "\n"
    with pytest.raises(BenchError, match=f"'{key}'"):
        load_protocol(write(tmp_path, text))


def test_invalid_toml_is_a_bench_error(tmp_path):
    with pytest.raises(BenchError, match="not valid TOML"):
        load_protocol(write(tmp_path, "name = \n"))


def test_unknown_protocol_lists_available():
    with pytest.raises(BenchError, match="unknown protocol 'nope'.*smoke"):
        load_protocol("nope")


def test_overrides_are_typed_and_checked():
    base = load_protocol("smoke")
    changed = apply_overrides(base, parse_assignments(["epochs=5", "milestones=[1, 2]", "lr=1"], "--set"))
    assert changed.epochs == 5 and changed.milestones == [1, 2] and changed.lr == 1.0
    with pytest.raises(BenchError, match="unknown protocol key 'epoch'"):
        apply_overrides(base, {"epoch": 5})
    with pytest.raises(BenchError, match="'epochs'"):
        apply_overrides(base, {"epochs": -1})
    with pytest.raises(BenchError, match="key=value"):
        parse_assignments(["epochs"], "--set")
