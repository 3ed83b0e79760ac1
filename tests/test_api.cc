#include <gtest/gtest.h>
#include "moe/moe.h"
TEST(Api, Smoke) {
  moe_context_t *ctx = nullptr; moe_layer_t *layer = nullptr;
  ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
  moe_layer_config_t cfg = moe_layer_config_default();
  cfg.d_model = 16; cfg.d_ff = 32; cfg.num_experts = 4; cfg.top_k = 2;
  ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS) << moe_last_error();
  std::vector<float> x(16 * 10, 0.5f), y(16 * 10), dx(16*10);
  for (size_t i = 0; i < x.size(); ++i) x[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
  ASSERT_EQ(moe_layer_forward(layer, x.data(), y.data(), 10, 1, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
  ASSERT_EQ(moe_layer_backward(layer, y.data(), dx.data(), nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
  ASSERT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
  ASSERT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
}
