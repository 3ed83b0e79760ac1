/* config.h - the layer config (config.c): validation and the cross-rank hash;
 * moe_layer_config_default is public (moe.h). */
#ifndef MOE_CONFIG_H
#define MOE_CONFIG_H

#include <stdint.h>

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* largest tensor dimension product we accept: keeps every index inside int64 and row ids
 * inside int32 */
#define MOE_MAX_NUMEL ((int64_t)1 << 40)

/* SUCCESS, or INVALID_ARGUMENT / NOT_SUPPORTED naming the first field that is wrong */
moe_status_t moe__config_validate(const moe_layer_config_t *cfg, moe_backend_t backend);

/* FNV-1a over the fields that must agree on every rank */
uint64_t moe__config_hash(const moe_layer_config_t *cfg);

#ifdef __cplusplus
}
#endif

#endif
