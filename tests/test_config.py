"""The configuration: its commented YAML template, and the type and range checks of its overrides."""

import dataclasses
import re

import pytest
import yaml

from acdc_potential.config import ConfigError, FitConfig

OPTION = re.compile(r"^  (\w+): ")


def sections_and_options():
    config = FitConfig()
    return [(f.name, option.name) for f in dataclasses.fields(config) for option in dataclasses.fields(getattr(config, f.name))]


def rejected(values) -> str:
    with pytest.raises(ConfigError) as error:
        FitConfig.from_dict(values)
    return str(error.value)


def test_the_template_reads_back_as_the_defaults():
    assert FitConfig.from_dict(yaml.safe_load(FitConfig.template())).to_dict() == FitConfig().to_dict()


def test_the_template_has_a_header_saying_how_to_use_it():
    header = FitConfig.template().split("\n\n")[0]
    assert all(line.startswith("#") for line in header.splitlines())
    assert "acdc-potential fit train.extxyz -o model.pt --config config.yaml" in header
    assert "subset" in header and " A " in header and "eV" in header


def comment_before(lines, index, indent):
    """The comment lines (at ``indent``) right before ``lines[index]``, joined, without the ``#``."""
    start = index
    while start > 0 and lines[start - 1].startswith(indent + "# "):
        start -= 1
    return " ".join(line[len(indent) + 2 :] for line in lines[start:index])


def test_every_section_and_option_of_the_template_has_a_comment_before_it():
    lines = FitConfig.template().splitlines()
    commented, section = set(), None
    for index, line in enumerate(lines):
        if re.match(r"^\w+:$", line):
            section = line[:-1]
            assert re.match(rf"^{section} \(\w+\): \S", comment_before(lines, index, "")), line
        elif OPTION.match(line):
            name = OPTION.match(line).group(1)
            assert comment_before(lines, index, "  ").strip(), f"{section}.{name} has no comment"
            commented.add((section, name))
    assert commented == set(sections_and_options())


def test_the_template_comments_are_wrapped_and_come_from_the_docstrings():
    template = FitConfig.template()
    assert max(len(line) for line in template.splitlines()) <= 100
    # a :param entry spread over several docstring lines is joined, reST roles made plain
    assert "# fraction of the training structures held out while tuning." in template
    assert "(select_on_grid)" in template and ":func:" not in template and "``" not in template
    # several :param entries on one docstring line are separated
    assert "  # use energy rows.\n  energies: true" in template
    assert "  # use force rows.\n  forces: true" in template


def test_the_template_writes_nested_values_as_yaml():
    template = FitConfig.template()
    for entry in ("  nu_max: [3, 4]", "  C: []", "  mixing: {}", "  isolated_energies: null", "  nu_max: auto", "  spline_accuracy: 1.0e-08"):
        assert entry in template.splitlines(), entry


def test_valid_overrides_are_kept():
    config = FitConfig.from_dict({"sparse": {"n": {"H": 300, "C": 200}}, "kernel": {"nu_max": 3}, "options": {"validation": 0.2}})
    assert config.sparse.n == {"H": 300, "C": 200}
    assert config.kernel.nu_max == 3
    assert config.options.validation == 0.2
    assert config.density == FitConfig().density


def test_an_integer_is_accepted_as_a_float_and_converted():
    config = FitConfig.from_dict({"density": {"cutoff": 4}, "grid": {"C": [1, 0.3]}, "options": {"isolated_energies": {"H": -13, 8: -2000.5}}})
    assert config.density.cutoff == 4.0 and isinstance(config.density.cutoff, float)
    assert config.grid.C == [1.0, 0.3] and all(isinstance(c, float) for c in config.grid.C)
    assert config.options.isolated_energies == {"H": -13.0, 8: -2000.5}


def test_empty_sections_keep_the_defaults():
    assert FitConfig.from_dict({"kernel": None, "sparse": {}}).to_dict() == FitConfig().to_dict()
    assert FitConfig.from_dict(None).to_dict() == FitConfig().to_dict()


def test_from_yaml_reads_a_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("kernel: {type: polynomial, zeta: 2}\nsparse:\n  n: {H: 30, 6: 20}\ngrid:\n  C: [0.1, 1]\n")
    config = FitConfig.from_yaml(str(path))
    assert (config.kernel.type, config.kernel.zeta) == ("polynomial", 2)
    assert config.sparse.n == {"H": 30, 6: 20}
    assert config.grid.C == [0.1, 1.0]
    path.write_text(FitConfig.template())
    assert FitConfig.from_yaml(str(path)).to_dict() == FitConfig().to_dict()


def test_from_yaml_rejects_a_file_that_is_not_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("kernel: {type: [wigner\n")
    with pytest.raises(ConfigError, match="config.yaml: not valid YAML"):
        FitConfig.from_yaml(str(path))


def test_a_bool_option_takes_only_true_or_false():
    assert "options.tune: expected true or false, got 1" in rejected({"options": {"tune": 1}})
    assert "options.stress: expected true or false, got 'yes please'" in rejected({"options": {"stress": "yes please"}})


def test_an_integer_option_takes_neither_a_bool_nor_a_float():
    assert "options.seed: expected an integer, got True" in rejected({"options": {"seed": True}})
    assert "kernel.lambda_max: expected an integer >= 0, got 2.5" in rejected({"kernel": {"lambda_max": 2.5}})


def test_a_float_option_takes_a_number():
    assert "options.validation: expected a number in (0, 1), got 'ten'" in rejected({"options": {"validation": "ten"}})
    assert "regularisers.forces: expected a number > 0, got False" in rejected({"regularisers": {"forces": False}})


def test_a_float_in_exponent_notation_without_a_point_gets_a_hint(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("density: {spline_accuracy: 1e-6}\n")
    with pytest.raises(ConfigError, match=r"density.spline_accuracy: .*got '1e-6'.*1\.0e-8"):
        FitConfig.from_yaml(str(path))
    assert "signed exponent" in rejected({"options": {"design_memory": "1.0e1"}})
    assert "signed exponent" not in rejected({"options": {"design_memory": "ten"}})
    assert "signed exponent" not in rejected({"keys": {"energy": 1e-6}})


def test_a_string_option_takes_one_of_its_choices():
    assert "kernel.type: expected one of 'wigner', 'polynomial', 'mpacdc', got 'gaussian'" in rejected({"kernel": {"type": "gaussian"}})
    assert "sparse.selection: expected one of 'fps', 'cur', got 'random'" in rejected({"sparse": {"selection": "random"}})
    assert "density.basis: expected one of 'le', 'gto', got 'bessel'" in rejected({"density": {"basis": "bessel"}})
    assert "density.density: expected one of 'gaussian', 'wigner'" in rejected({"density": {"density": "soap"}})
    assert "keys.energy: expected a string, got 3" in rejected({"keys": {"energy": 3}})


def test_kernel_orders_are_one_to_three():
    assert "kernel.orders[1]: expected an integer in [1, 4), got 4" in rejected({"kernel": {"orders": [2, 4]}})
    assert FitConfig.from_dict({"kernel": {"type": "polynomial", "orders": [1, 3]}}).kernel.orders == [1, 3]


def test_nu_max_takes_an_integer_or_auto():
    assert "kernel.nu_max: expected an integer >= 0 or 'auto', got 'automatic'" in rejected({"kernel": {"nu_max": "automatic"}})
    assert "kernel.nu_max: expected an integer >= 0 or 'auto', got 3.0" in rejected({"kernel": {"nu_max": 3.0}})
    assert FitConfig.from_dict({"kernel": {"nu_max": "auto"}}).kernel.nu_max == "auto"


def test_a_list_option_takes_a_list_of_its_items():
    assert "grid.C: expected a list of numbers > 0, got 0.3" in rejected({"grid": {"C": 0.3}})
    assert "grid.nu_max[1]: expected an integer >= 1, got 'four'" in rejected({"grid": {"nu_max": [3, "four"]}})
    assert "grid.nu_max[0]: expected an integer >= 1, got 0" in rejected({"grid": {"nu_max": [0, 3]}})
    assert "density.max_radial[0]: expected an integer >= 0, got 4.5" in rejected({"density": {"max_radial": [4.5, 3]}})
    assert FitConfig.from_dict({"density": {"max_radial": [6, 5, 4]}}).density.max_radial == [6, 5, 4]


def test_a_mapping_option_takes_a_mapping_of_its_items():
    assert "sparse.n.H: expected an integer > 0, got 'many'" in rejected({"sparse": {"n": {"H": "many"}}})
    assert "kernel.mixing: expected a mapping from strings to numbers > 0, got [1.0]" in rejected({"kernel": {"mixing": [1.0]}})
    assert "kernel.mixing (key 1): expected a string, got 1" in rejected({"kernel": {"mixing": {1: 0.5}}})
    message = rejected({"options": {"isolated_energies": {"H": "low"}}})
    assert "options.isolated_energies.H: expected a number, got 'low'" in message


def test_a_number_out_of_its_range_is_rejected():
    assert "density.cutoff: expected a number > 0, got -5" in rejected({"density": {"cutoff": -5}})
    assert "regularisers.energy: expected a number > 0, got 0" in rejected({"regularisers": {"energy": 0}})
    assert "options.validation: expected a number in (0, 1), got 1.0" in rejected({"options": {"validation": 1.0}})
    assert "options.design_memory: expected a number > 0, got -1" in rejected({"options": {"design_memory": -1}})
    assert "sparse.n: expected an integer > 0 or a mapping" in rejected({"sparse": {"n": 0}})
    assert "sparse.n.C: expected an integer > 0, got -2" in rejected({"sparse": {"n": {"C": -2}}})
    assert "grid.r0[0]: expected a number > 0, got 0.0" in rejected({"grid": {"r0": [0.0]}})


def test_unknown_sections_and_options_are_config_errors():
    assert "unknown configuration section 'kernels'" in rejected({"kernels": {}})
    assert "unknown configuration section 'to_dict'" in rejected({"to_dict": {}})
    message = rejected({"kernel": {"nu_maximum": 3}})
    assert "nu_maximum" in message and "section 'kernel'" in message
    assert "density: expected a mapping of options, got 5" in rejected({"density": 5})
    assert "expected a mapping of sections" in rejected([1, 2])


def test_a_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
