// test_trace_read.cc - the shared trace reader (bench/trace_read.c) on crafted files: a header
// whose routing width does not fit its router, a record claiming 2^61 tokens, a file cut inside
// a record, trailing garbage, bad experts; and the writer's I/O failures (a full device, a file
// size limit hit by one forward's record).
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "moe/moe.h"
#include "moe/trace_format.h"
#include "test_util.h"
#include "trace_read.h"

namespace {

std::string tmp_path(const char *name) {
    const char *d = std::getenv("TMPDIR");
    return std::string(d ? d : "/tmp") + "/moe_trace_read_" + std::to_string(getpid()) + "_" +
           name;
}

std::vector<char> slurp(const std::string &p) {
    std::vector<char> v;
    FILE *f = std::fopen(p.c_str(), "rb");
    if (!f) return v;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) v.insert(v.end(), buf, buf + n);
    std::fclose(f);
    return v;
}

void spit(const std::string &p, const std::vector<char> &v) {
    FILE *f = std::fopen(p.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    if (!v.empty()) {
        ASSERT_EQ(std::fwrite(v.data(), 1, v.size(), f), v.size());
    }
    std::fclose(f);
}

// a real trace of 3 forwards (5, 0 and 4 tokens) of a 6-expert top-2 layer
std::vector<char> real_trace(moe_router_type_t router = MOE_ROUTER_TOKEN_CHOICE) {
    moe_layer_config_t c = moetest::small_config(8, 8, 6, 2);
    c.router = router;
    moetest::Layer l(c);
    EXPECT_EQ(l.status, MOE_STATUS_SUCCESS);
    std::string p = tmp_path("real");
    EXPECT_EQ(moe_layer_trace_open(l, p.c_str(), 7), MOE_STATUS_SUCCESS) << moe_last_error();
    std::vector<float> x = moetest::uniform(5 * 8, 2), y(5 * 8);
    for (int64_t T : {5, 0, 4})
        EXPECT_EQ(moe_layer_forward(l, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_trace_close(l), MOE_STATUS_SUCCESS);
    std::vector<char> v = slurp(p);
    std::remove(p.c_str());
    return v;
}

// reads bytes through a file; returns the reader's result and its message
int read_bytes(const std::vector<char> &v, std::string *msg = nullptr, trace_file_t *out = nullptr) {
    std::string p = tmp_path("crafted");
    spit(p, v);
    trace_file_t t;
    char err[512] = "";
    int rc = trace_file_read(p.c_str(), &t, err, sizeof err);
    if (msg) *msg = err;
    if (rc == 0 && out) *out = t;
    else if (rc == 0) trace_file_free(&t);
    std::remove(p.c_str());
    return rc;
}

const size_t kHdr = sizeof(moe_trace_header_t), kRec = sizeof(moe_trace_record_t);

}  // namespace

TEST(TraceRead, RealTraceReads) {
    std::vector<char> v = real_trace();
    trace_file_t t;
    std::string msg;
    ASSERT_EQ(read_bytes(v, &msg, &t), 0) << msg;
    EXPECT_EQ(t.n, 3);
    EXPECT_EQ(t.rec[0].r.num_tokens, 5);
    EXPECT_EQ(t.rec[1].r.num_tokens, 0);
    EXPECT_EQ(t.h.routing_width, 2);
    trace_file_free(&t);
    std::vector<char> ec = real_trace(MOE_ROUTER_EXPERT_CHOICE);
    ASSERT_EQ(read_bytes(ec, &msg, &t), 0) << msg;
    EXPECT_EQ(t.h.routing_width, 6);
    // an expert-choice trace (6 wide) must not be replayed by a top-2 layer (2 wide), nor the
    // other way round: the layer check compares the width
    moetest::Layer tc(moetest::small_config(8, 8, 6, 2));
    char err[256];
    EXPECT_NE(trace_file_check_layer(&t, tc, err, sizeof err), 0);
    EXPECT_NE(std::strstr(err, "width"), nullptr) << err;
    trace_file_free(&t);
    ASSERT_EQ(read_bytes(v, &msg, &t), 0);
    EXPECT_EQ(trace_file_check_layer(&t, tc, err, sizeof err), 0) << err;
    trace_file_free(&t);
}

TEST(TraceRead, TooWideRoutingWidthInTheHeader) {
    std::vector<char> v = real_trace();
    moe_trace_header_t h;
    std::memcpy(&h, v.data(), kHdr);
    h.routing_width = 64; // wider than any record and than the layer: read past a buffer before
    std::memcpy(v.data(), &h, kHdr);
    std::string msg;
    EXPECT_NE(read_bytes(v, &msg), 0);
    EXPECT_NE(msg.find("routing_width"), std::string::npos) << msg;
    // a record width that disagrees with the header
    v = real_trace();
    moe_trace_record_t r;
    std::memcpy(&r, v.data() + kHdr, kRec);
    r.width = 3;
    std::memcpy(v.data() + kHdr, &r, kRec);
    EXPECT_NE(read_bytes(v, &msg), 0);
    EXPECT_NE(msg.find("width"), std::string::npos) << msg;
}

TEST(TraceRead, HugeTokenCountsAreRefusedWithoutOverflow) {
    for (int64_t T : {(int64_t)1 << 61, INT64_MAX, (int64_t)1 << 40, (int64_t)6, (int64_t)-1}) {
        std::vector<char> v = real_trace();
        moe_trace_record_t r;
        std::memcpy(&r, v.data() + kHdr, kRec);
        r.num_tokens = T;
        std::memcpy(v.data() + kHdr, &r, kRec);
        std::string msg;
        EXPECT_NE(read_bytes(v, &msg), 0) << T;
        EXPECT_FALSE(msg.empty());
    }
}

TEST(TraceRead, TruncatedFilesAreErrors) {
    std::vector<char> v = real_trace();
    // every cut: inside the header, inside a record header, inside a body
    for (size_t cut = 1; cut < v.size(); cut += 1) {
        std::vector<char> w(v.begin(), v.begin() + (long)cut);
        std::string msg;
        int rc = read_bytes(w, &msg);
        // the only valid prefixes end exactly at a record boundary
        size_t b0 = kHdr, b1 = b0 + kRec + 5 * 2 * 9 + 2 * 6 * 8, b2 = b1 + kRec + 2 * 6 * 8;
        if (cut == b0 || cut == b1 || cut == b2) EXPECT_EQ(rc, 0) << cut << ": " << msg;
        else EXPECT_NE(rc, 0) << "cut at " << cut << " of " << v.size();
    }
}

TEST(TraceRead, TrailingGarbageIsAnError) {
    for (size_t extra : {1, 5, 31, 32, 40, 200}) {
        std::vector<char> v = real_trace();
        v.insert(v.end(), extra, '\x5a');
        std::string msg;
        EXPECT_NE(read_bytes(v, &msg), 0) << extra << " bytes";
    }
}

TEST(TraceRead, BadFieldsInRecords) {
    const size_t body = kHdr + kRec;
    struct Case { const char *what; size_t off; std::vector<char> bytes; };
    int32_t e99 = 99, eneg = -1, dup;
    float nan = NAN;
    std::vector<char> v0 = real_trace();
    std::memcpy(&dup, v0.data() + body, 4);
    auto b = [](const void *p, size_t n) {
        return std::vector<char>((const char *)p, (const char *)p + n);
    };
    uint8_t kept2 = 2;
    int64_t neg = -5;
    const Case cases[] = {
        {"expert 99", body, b(&e99, 4)},
        {"expert -1", body, b(&eneg, 4)},
        {"expert twice", body + 4, b(&dup, 4)},
        {"gate NaN", body + 5 * 2 * 4, b(&nan, 4)},
        {"kept 2", body + 5 * 2 * 8, b(&kept2, 1)},
        {"negative count", body + 5 * 2 * 9, b(&neg, 8)},
    };
    for (const Case &c : cases) {
        std::vector<char> v = v0;
        std::memcpy(v.data() + c.off, c.bytes.data(), c.bytes.size());
        std::string msg;
        EXPECT_NE(read_bytes(v, &msg), 0) << c.what;
    }
    // header fields
    std::vector<char> v = v0;
    moe_trace_header_t h;
    std::memcpy(&h, v.data(), kHdr);
    h.num_experts = 0;
    std::memcpy(v.data(), &h, kHdr);
    EXPECT_NE(read_bytes(v), 0);
    EXPECT_NE(read_bytes(std::vector<char>()), 0) << "an empty file";
}

// --- the writer's I/O failures ------------------------------------------------------------------

TEST(TraceWrite, FullDeviceFailsTheOpen) {
    moetest::Layer l(moetest::small_config());
    // unbuffered writes: the header fails at once, not at a later flush
    EXPECT_EQ(moe_layer_trace_open(l, "/dev/full", 0), MOE_STATUS_IO_ERROR);
    std::vector<float> x = moetest::uniform(3 * 8, 1), y(3 * 8);
    EXPECT_EQ(moe_layer_forward(l, x.data(), y.data(), 3, 0, nullptr), MOE_STATUS_SUCCESS);
}

TEST(TraceWrite, TheForwardWhoseRecordIsLostReportsIoError) {
    moe_layer_config_t c = moetest::small_config(8, 8, 6, 2);
    moetest::Layer l(c);
    std::string p = tmp_path("limited");
    ASSERT_EQ(moe_layer_trace_open(l, p.c_str(), 7), MOE_STATUS_SUCCESS);
    std::vector<float> x = moetest::uniform(5 * 8, 2), y(5 * 8);
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), 5, 0, nullptr), MOE_STATUS_SUCCESS);
    const size_t one = kHdr + kRec + 5 * 2 * 9 + 2 * 6 * 8;
    // a file size limit a few bytes past the first record: the second record cannot be written
    struct rlimit old;
    ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = old;
    lim.rlim_cur = one + 10;
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
    moe_status_t st2 = moe_layer_forward(l, x.data(), y.data(), 5, 0, nullptr);
    std::string msg = moe_last_error();
    moe_status_t st3 = moe_layer_forward(l, x.data(), y.data(), 4, 0, nullptr);
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, prev);
    EXPECT_EQ(st2, MOE_STATUS_IO_ERROR) << "the forward whose record was lost";
    EXPECT_NE(msg.find("lost"), std::string::npos) << msg;
    EXPECT_EQ(st3, MOE_STATUS_IO_ERROR);
    // the results of a forward that lost its record are valid
    std::vector<int32_t> idx(4 * 2);
    EXPECT_EQ(moe_layer_routing(l, idx.data(), nullptr, nullptr), MOE_STATUS_SUCCESS);
    // with room again the trace continues; the file holds records 0 and 3, and reads cleanly
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), 3, 0, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_trace_close(l), MOE_STATUS_SUCCESS);
    trace_file_t t;
    char err[512];
    ASSERT_EQ(trace_file_read(p.c_str(), &t, err, sizeof err), 0) << err;
    ASSERT_EQ(t.n, 2);
    EXPECT_EQ(t.rec[0].r.step, 0);
    EXPECT_EQ(t.rec[1].r.step, 3);
    EXPECT_EQ(t.rec[1].r.num_tokens, 3);
    trace_file_free(&t);
    std::remove(p.c_str());
}
