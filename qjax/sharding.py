"""Sharding quantized trees: PartitionSpecs of the dense kernels -> shardings of codes, statistics and adapters.

See docs/sharding.md. The same names stay importable from `qjax` itself for one release.
"""

from qjax._src.matmul.sharded import qmatmul_sharded as qmatmul_sharded
from qjax._src.sharding.lora import lora_sharding as lora_sharding
from qjax._src.sharding.specs import quantized_sharding as quantized_sharding
from qjax._src.sharding.trees import optimizer_sharding as optimizer_sharding
from qjax._src.sharding.trees import params_sharding as params_sharding
from qjax._src.sharding.trees import quantize_params_sharded as quantize_params_sharded
from qjax._src.sharding.trees import shard_params as shard_params
from qjax._src.sharding.trees import with_sharding_constraint as with_sharding_constraint

__all__ = ["lora_sharding", "optimizer_sharding", "params_sharding", "qmatmul_sharded", "quantize_params_sharded",
           "quantized_sharding", "shard_params", "with_sharding_constraint"]
