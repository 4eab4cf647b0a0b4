"""OpenVINO INT8 export that keeps each model's fragile parts in floating point.

anomalib's exporter (``ExportMixin.to_openvino`` with ``compression_type`` ``INT8`` / ``INT8_PTQ`` /
``INT8_ACQ``) hands the whole exported graph to NNCF. That graph is more than the network: it holds
anomalib's post-processing (min/max normalisation, thresholds, ``clamp``), the anomaly-map head (cosine
or squared distances, up-sampling, the 33x33 Gaussian blur, ``amax``) and, per model, statistics baked
in as constants. NNCF's default recipe puts 8-bit fake-quantisers on all of it:

- an anomaly map quantised over its whole range has ~256 levels, while normal and defective images
  differ by a fraction of one level after the max: every image gets the same score (URD, 0.92 -> 0.50
  image AUROC), and the normalisation that follows turns that into a constant 0 or 1;
- OpenVINO's low-precision transformations move de-quantisation scales through the post-processor's
  ``clamp``; with a NaN threshold (a model never validated) the clamp bounds become NaN and the model
  does not compile (``Attribute 'min' must be less or equal than 'max'``);
- the selective scan's recurrence multiplies states through ``exp(delta A)`` decays over the whole
  sequence: 8-bit states accumulate error step after step.

:class:`OpenVINOQuantizationMixin` passes NNCF an ``ignored_scope`` built from the PyTorch modules
named in the model's :class:`QuantizationRecipe`: the ONNX graph written by ``to_onnx`` (the dynamo
exporter) records for every node the module that ran it (``pkg.torch.onnx.name_scopes`` /
``class_hierarchy``), and OpenVINO keeps ONNX node names, so the float parts are found by module, not
by fragile generated node names. Everything else (the teachers' and students' convolutions and
matmuls, where the time goes) is quantised with NNCF's defaults.
"""

from __future__ import annotations

import ast
import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from anomalib import TaskType
    from anomalib.data import AnomalibDataModule
    from anomalib.deploy.export import CompressionType
    from openvino import Model
    from torchmetrics import Metric

logger = logging.getLogger(__name__)

__all__ = ["OpenVINOQuantizationMixin", "QuantizationRecipe", "float_op_names", "onnx_module_scopes"]

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_CLASSES_KEY = "pkg.torch.onnx.class_hierarchy"


@dataclass(frozen=True)
class QuantizationRecipe:
    """Which parts of an exported model stay floating point under INT8 compression, and NNCF options.

    Args:
        float_modules: patterns (``fnmatch``; ``*`` also crosses dots) matched against the module that
            runs each op: its path in the ``AnomalibModule`` (``"post_processor"``,
            ``"model.anomaly_map_generator*"``) or its class name (``"SS2D"``). Only the innermost
            module counts, so ``"model"`` keeps the torch model's own ``forward`` ops float but not its
            sub-networks. Every pattern must match at least one op (a renamed module is an error, not
            a logged warning).
        model_type: NNCF ``ModelType`` name (``"transformer"``) or ``None`` (NNCF's default).
        preset: NNCF ``QuantizationPreset`` name (``"performance"``, ``"mixed"``) or ``None``.
        fast_bias_correction: ``False`` runs NNCF's full bias correction (slower, more exact); ``None``:
            NNCF's default (fast).
        smooth_quant_alpha: SmoothQuant migration strength for matmuls (``AdvancedSmoothQuantParameters``);
            ``None``: NNCF's default.
        reason: one line saying why the float parts are float (shown in logs and docs).
    """

    float_modules: tuple[str, ...] = ("post_processor",)
    model_type: str | None = None
    preset: str | None = None
    fast_bias_correction: bool | None = None
    smooth_quant_alpha: float | None = None
    reason: str = "anomalib's post-processing (normalisation constants, thresholds, clamp) stays float."

    def nncf_options(self, advanced_key: str = "advanced_parameters") -> dict[str, Any]:
        """Keyword arguments for ``nncf.quantize`` (options left at ``None`` are not passed).

        ``advanced_key``: the name of the advanced-parameters argument
        (``nncf.quantize_with_accuracy_control`` calls it ``advanced_quantization_parameters``).
        """
        import nncf

        options: dict[str, Any] = {}
        if self.model_type is not None:
            options["model_type"] = nncf.ModelType(self.model_type)
        if self.preset is not None:
            options["preset"] = nncf.QuantizationPreset(self.preset)
        if self.fast_bias_correction is not None:
            options["fast_bias_correction"] = self.fast_bias_correction
        if self.smooth_quant_alpha is not None:
            from nncf.quantization.advanced_parameters import (
                AdvancedQuantizationParameters,
                AdvancedSmoothQuantParameters,
            )

            alphas = AdvancedSmoothQuantParameters(matmul=self.smooth_quant_alpha)
            options[advanced_key] = AdvancedQuantizationParameters(smooth_quant_alphas=alphas)
        return options


def onnx_module_scopes(onnx_path: str | Path) -> dict[str, tuple[str, str]]:
    """For every node (and output tensor) name of a dynamo-exported ONNX file: ``(module path, class)``.

    The module is the innermost one whose ``forward`` ran the op (``""`` for the top module).
    Nodes without the exporter's metadata are left out.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    scopes: dict[str, tuple[str, str]] = {}
    for node in graph.node:
        metadata = {prop.key: prop.value for prop in node.metadata_props}
        if _SCOPES_KEY not in metadata:
            continue
        paths = ast.literal_eval(metadata[_SCOPES_KEY])[:-1]  # modules, outermost first; last is the op
        classes = ast.literal_eval(metadata.get(_CLASSES_KEY, "[]"))[:-1]
        module = paths[-1] if paths else ""
        class_name = classes[-1].rsplit(".", 1)[-1] if classes else ""
        for name in (node.name, *node.output):
            scopes.setdefault(name, (module, class_name))
    return scopes


def _onnx_key(friendly_name: str, scopes: dict[str, tuple[str, str]]) -> str | None:
    """The ONNX node behind an OpenVINO op: same name, or the name before a suffix OpenVINO appended."""
    if friendly_name in scopes:
        return friendly_name
    for separator in ("/", ":", "."):
        head = friendly_name.split(separator, 1)[0]
        if head in scopes:
            return head
    return None


def float_op_names(model: Model, scopes: dict[str, tuple[str, str]], patterns: Iterable[str]) -> list[str]:
    """Names of the OpenVINO ops run by a module matching one of ``patterns`` (see QuantizationRecipe).

    OpenVINO keeps the ONNX node names of most ops; ops it creates while converting (a LayerNorm fused
    into ``MVN``, a scale folded into a ``Multiply``) have new names and take the decision of their
    inputs: float when every non-constant input is float.

    A pattern that matches nothing is logged as a warning (a renamed module would be quantised).
    """
    patterns = tuple(patterns)
    matched: dict[str, int] = dict.fromkeys(patterns, 0)
    is_float: dict[str, bool] = {}
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        if kind in {"Parameter", "Result", "Constant"}:
            continue
        key = _onnx_key(name, scopes)
        if key is not None:
            module, class_name = scopes[key]
            hits = [
                p for p in patterns if fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(class_name, p)
            ]
            for pattern in hits:
                matched[pattern] += 1
            is_float[name] = bool(hits)
        else:
            producers = [op.input_value(i).get_node() for i in range(op.get_input_size())]
            names = [p.get_friendly_name() for p in producers if p.get_type_name() != "Constant"]
            is_float[name] = bool(names) and all(is_float.get(n, False) for n in names)
    unmatched = [pattern for pattern, count in matched.items() if count == 0]
    if unmatched:  # e.g. DHKD without blur; a renamed module would otherwise be quantised unnoticed
        logger.warning("QuantizationRecipe float_modules %s match no op of the exported graph.", unmatched)
    return [name for name, flag in is_float.items() if flag]


def _static_spatial_size(model: Model) -> tuple[int, int] | None:
    """(H, W) of the IR's image input when both are static, else ``None``."""
    shape = model.input(0).partial_shape
    if shape.rank.is_static and len(shape) == 4 and shape[2].is_static and shape[3].is_static:
        return shape[2].get_length(), shape[3].get_length()
    return None


def _image_batch_transform(model: Model) -> Callable[[Any], Any]:
    """Calibration/validation item -> the IR's input: float32 RGB [0, 1] NCHW at the IR's static size.

    Dataset images come at their stored size; the exported graph (``--input_size``) takes one fixed
    size and resizes inside to the model's own size, so images are brought to the IR's size first (as
    the line runner does), with antialiasing.
    """
    size = _static_spatial_size(model)

    def transform(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            images = item
        else:  # anomalib's batches; FewShotTasks' episodes (query images)
            images = item.image if hasattr(item, "image") else item["image"]
        images = images.float()
        if size is not None and tuple(images.shape[-2:]) != size:
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
        return images.numpy()

    return transform


class OpenVINOQuantizationMixin:
    """anomalib's OpenVINO INT8 export with a per-model float scope (see the module docstring).

    Put it before ``AnomalibModule`` in the bases and set ``quantization_recipe``. ``to_onnx`` records the
    module of every exported node; ``_compress_ov_model`` (called by ``to_openvino``) turns the recipe
    into NNCF's ``ignored_scope`` for ``INT8`` (weights), ``INT8_PTQ`` and ``INT8_ACQ``.
    """

    quantization_recipe: ClassVar[QuantizationRecipe] = QuantizationRecipe()
    _onnx_scopes: dict[str, tuple[str, str]] | None = None

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:
        """anomalib's ``to_onnx``, then remember which module produced each node (read back from the file)."""
        # Exported under no_grad: a ``torch.no_grad()`` block inside forward (the models' frozen teachers)
        # otherwise becomes one higher-order op whose ops all carry the first module's name scope.
        with torch.no_grad():
            path = super().to_onnx(*args, **kwargs)  # type: ignore[misc]
        self._onnx_scopes = onnx_module_scopes(path)
        return path

    def quantization_ignored_scope(self, model: Model) -> Any:
        """NNCF ``IgnoredScope`` holding the ops of the recipe's float modules in ``model``."""
        import nncf

        if not self._onnx_scopes:
            msg = (
                f"{type(self).__name__}: no module information for the OpenVINO graph. INT8 compression "
                "must run through to_openvino (which exports ONNX first with torch's dynamo exporter)."
            )
            raise RuntimeError(msg)
        names = float_op_names(model, self._onnx_scopes, self.quantization_recipe.float_modules)
        logger.info(
            "%s INT8: %d ops kept in float (%s). %s",
            type(self).__name__,
            len(names),
            ", ".join(self.quantization_recipe.float_modules),
            self.quantization_recipe.reason,
        )
        # The names come from this very graph; NNCF drops non-quantisable ones (validate=False).
        return nncf.IgnoredScope(names=names, validate=False)

    def _compress_ov_model(
        self,
        model: Model,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
    ) -> Model:
        """anomalib's dispatch, with the float scope also on ``INT8`` (8-bit weights only)."""
        from anomalib.deploy.export import CompressionType

        if compression_type == CompressionType.INT8:
            import nncf

            return nncf.compress_weights(model, ignored_scope=self.quantization_ignored_scope(model))
        return super()._compress_ov_model(  # type: ignore[misc]
            model, compression_type, datamodule, metric, task, max_drop
        )

    @staticmethod
    def _calibration_loader(datamodule: AnomalibDataModule | None, model: Model, kind: str) -> Any:
        """The datamodule's validation loader (anomalib's choice).

        For MVTec-style datamodules that split is made of test images, so INT8 ranges are fitted on them,
        as anomalib's thresholds are; a validation split of the user's own avoids it (docs/fidelity.md).
        Two leak-free defaults were tried: the training normals alone, and normals with synthetic Perlin
        anomalies. With either, DHKD's INT8 scores collapse to one value and D24FAD's ranking breaks
        (Spearman 0.37-0.54 vs f32) on the tests' tiny data.
        """
        if datamodule is None:
            msg = f"Datamodule must be provided for OpenVINO {kind} compression (calibration images)."
            raise ValueError(msg)
        datamodule.setup("fit")
        if model.input(0).partial_shape[0].is_static:
            datamodule.train_batch_size = model.input(0).shape[0]
            datamodule.eval_batch_size = model.input(0).shape[0]
        dataloader = datamodule.val_dataloader()
        if len(dataloader.dataset) < 300:
            logger.warning(
                ">300 images recommended for INT8 quantization, found only %d images", len(dataloader.dataset)
            )
        return dataloader

    def _post_training_quantization_ov(
        self, model: Model, datamodule: AnomalibDataModule | None = None
    ) -> Model:
        """``nncf.quantize`` on validation images, with the model's float scope and options."""
        import nncf

        dataloader = self._calibration_loader(datamodule, model, "INT8_PTQ")
        return nncf.quantize(
            model,
            nncf.Dataset(dataloader, _image_batch_transform(model)),
            ignored_scope=self.quantization_ignored_scope(model),
            **self.quantization_recipe.nncf_options(),
        )

    def _accuracy_control_quantization_ov(
        self,
        model: Model,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
    ) -> Model:
        """``nncf.quantize_with_accuracy_control`` with the float scope; the metric is measured on the
        validation images (anomalib uses the test split) and reset between evaluations."""
        import nncf
        from anomalib.data import ImageBatch

        del task
        if not 0 <= max_drop <= 1:
            msg = f"max_drop must be between 0 and 1, got {max_drop}"
            raise ValueError(msg)
        if metric is None:
            from anomalib.metrics import F1Score

            metric = F1Score(fields=["pred_label", "gt_label"])
        dataloader = self._calibration_loader(datamodule, model, "INT8_ACQ")
        to_input = _image_batch_transform(model)

        def validate(compiled: Any, batches: Iterable) -> float:
            metric.reset()
            for batch in batches:
                outputs = compiled(to_input(batch))
                names = {port.get_any_name(): value for port, value in outputs.items()}
                metric.update(
                    ImageBatch(
                        image=batch.image,
                        pred_score=torch.from_numpy(names["pred_score"]).reshape(-1),
                        pred_label=torch.from_numpy(names["pred_label"]).reshape(-1),
                        gt_label=batch.gt_label,
                        anomaly_map=torch.from_numpy(names["anomaly_map"])
                        if "anomaly_map" in names
                        else None,
                        pred_mask=torch.from_numpy(names["pred_mask"]) if "pred_mask" in names else None,
                        gt_mask=None if getattr(batch, "gt_mask", None) is None else batch.gt_mask[:, None],
                    )
                )
            return float(metric.compute())

        return nncf.quantize_with_accuracy_control(
            model,
            nncf.Dataset(dataloader, to_input),
            nncf.Dataset(dataloader),
            validate,
            max_drop=max_drop,
            ignored_scope=self.quantization_ignored_scope(model),
            **self.quantization_recipe.nncf_options("advanced_quantization_parameters"),
        )
