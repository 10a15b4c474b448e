import MoEModel
import MoETestSupport

// Backend choice for the model tests: the rule at the top of
// Tests/MoETestSupport/TestSupport.swift. Tests here run on the CPU backend
// unless they are OpenCL cases: named `testOpenCL...` or `...OpenCL`, getting the
// device from `TestBackends.openCLOrSkip()`, run in the OpenCL pass only.
typealias TestBackends = TestDevices

/// A small byte-level Llama (2 layers, 4 heads over 2 KV heads), with a
/// Mixtral-style top-2 of 4 block in layer 1 when `moe`, as an LM training config.
func smallLMTrainConfig(moe: Bool, hidden: Int, intermediate: Int) -> TrainConfig {
    var t = TrainConfig()
    t.task = "lm"
    var lm = LMRecipe.denseModel()
    lm.hidden = hidden; lm.intermediate = intermediate; lm.layers = 2; lm.heads = 4; lm.kvHeads = 2
    if moe { lm.moe = LMRecipe.mixtralMoE(experts: 4, topK: 2); lm.moeLayers = [1] }
    t.lm = lm
    t.augment = false; t.evalEvery = 0
    return t
}
