// The engine's schedule-invariance suite (engine_schedules.h) on the CUDA backend and both fixtures.
// With dbrx_model_params.batch_invariant the GPU must be as strict as the CPU: bitwise the same
// logits and ids alone, all at once, from the prefix cache and after preemption. The default
// (fast) mode picks kernels by batch shape, so there the schedules agree within bf16 noise only.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "engine_schedules.h"

namespace dbrx::testing {
namespace {

constexpr float kGpuRefTolerance = 0.1f;  // bf16 weights and activations against the float64 reference
constexpr double kGpuMarginFloor = 0.2;

dbrx_model_params cuda_params(bool invariant) {
    dbrx_model_params mp = dbrx_model_default_params();
    mp.device = DBRX_DEVICE_CUDA;
    mp.batch_invariant = invariant;
    return mp;
}

class CudaEngine : public ::testing::TestWithParam<std::string> {
protected:
    void SetUp() override {
        if (!dbrx_cuda_available()) GTEST_SKIP() << "no CUDA device";
    }
};

TEST_P(CudaEngine, BatchInvariantModeIsBitwiseTheSameUnderEverySchedule) {
    const float seen = expect_same_results_under_every_schedule(std::string(DBRX_SOURCE_DIR) + GetParam(),
                                                                cuda_params(true),
                                                                ScheduleTolerances{0.f, kGpuRefTolerance, kGpuMarginFloor});
    std::printf("batch-invariant mode: max |logit difference| between schedules %g\n", seen);
}

TEST_P(CudaEngine, DefaultModeSchedulesAgreeWithinBf16Noise) {
    const float seen = expect_same_results_under_every_schedule(std::string(DBRX_SOURCE_DIR) + GetParam(),
                                                                cuda_params(false),
                                                                ScheduleTolerances{5e-2f, kGpuRefTolerance, kGpuMarginFloor});
    std::printf("default mode: max |logit difference| between schedules %g\n", seen);
}

TEST_P(CudaEngine, SeededSamplingIsTheSameAloneAndInABatch) {
    expect_seeded_sampling_batch_independent(std::string(DBRX_SOURCE_DIR) + GetParam(), cuda_params(true));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaEngine, ::testing::Values("/fixtures/tiny-dbrx", "/models/tiny-dbrx-cl100k"),
                         [](const auto &info) { return info.index == 0 ? std::string("tiny_dbrx") : std::string("tiny_dbrx_cl100k"); });

}  // namespace
}  // namespace dbrx::testing
