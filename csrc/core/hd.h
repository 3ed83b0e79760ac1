/* hd.h - MOE_HD: marks inline bodies that compile for both the host (C11) and CUDA device code. */
#ifndef MOE_CORE_HD_H
#define MOE_CORE_HD_H

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

#endif
