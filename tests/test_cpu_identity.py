"""The CPU as pyllm info and the benchmark records name it (pyllm.info.cpu_identity)."""

from pyllm.info import cpu_identity, cpu_label

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 other
bugs\t\t: none

processor\t: 1
cpu family\t: 26
model\t\t: 2
model name\t: Other
"""


def test_family_model_and_vector_extensions_of_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    ident = cpu_identity(path)
    assert ident == {"name": "AMD EPYC", "isa": ["avx2", "fma", "avx512f", "avx512_bf16"], "family": 25, "model": 17,
                     "stepping": 1}
    assert cpu_label(ident) == "AMD EPYC (family 25 model 17)"


def test_without_cpuinfo_the_platform_names_the_cpu(tmp_path):
    ident = cpu_identity(tmp_path / "missing")
    assert ident["isa"] == [] and "family" not in ident and ident["name"]
    assert cpu_label(ident) == ident["name"]
