// ep_mpi.h - shared by the MPI test programs (ctest runs each through mpiexec): the rank and
// size of MPI_COMM_WORLD, and a main that runs the tests on every rank and fails the job when
// any rank failed.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

namespace ep {

inline int world_rank() {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

inline int world_size() {
    int s = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &s);
    return s;
}

inline int mpi_test_main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    ::testing::InitGoogleTest(&argc, argv);
    int rc = RUN_ALL_TESTS();
    int worst = rc;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return worst;
}

}  // namespace ep
