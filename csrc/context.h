/* context.h - the context handle (internal): one backend on one device, and the communicator
 * its layers exchange rows over. Backends read the device and keep their own state in impl. */
#ifndef MOE_CONTEXT_H
#define MOE_CONTEXT_H

#include <stdint.h>

#include "backend/memory.h"
#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_CONTEXT_MAGIC 0x4D4F4543u /* "MOEC" */

typedef struct moe_backend_ops moe_backend_ops_t; /* backend/backend.h */

struct moe_context {
    uint32_t magic;
    moe_backend_t backend;
    int device;
    const moe_backend_ops_t *ops;
    void *impl; /* the backend's own state (cuBLAS handle, ...) */
    moe_memory_t mem; /* ops->mem acting in this context: what the communicator sees */
    moe_comm_t *comm;
    int rank, world;
    int64_t num_layers;
};

#ifdef __cplusplus
}
#endif

#endif
