/* mixture_data.c - the mixture problem of train_mixture: a splitmix64 stream, R regimes with
 * their centres and teacher networks, tokens sampled from them, and batches. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mixture.h"

/* ---------------------------------------------------------------------------------------------
 * the data: R regimes, each a cluster of inputs with its own teacher network
 * ------------------------------------------------------------------------------------------- */


unsigned long long rng_next(rng_t *r) { /* splitmix64 */
    unsigned long long z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
double rng_uniform(rng_t *r) { return ((double)(rng_next(r) >> 11) + 0.5) / 9007199254740992.0; }
double rng_normal(rng_t *r) {
    return sqrt(-2.0 * log(rng_uniform(r))) * cos(6.283185307179586 * rng_uniform(r));
}


int problem_init(problem_t *p, const options_t *o, rng_t *rng) {
    p->R = o->regimes, p->D = o->d_model, p->O = o->d_out, p->H = o->teacher_width;
    p->centre_norm = 4.0; /* centres this far apart relative to the unit noise: separable */
    p->mu = malloc(sizeof(float) * (size_t)(p->R * p->D));
    p->U = malloc(sizeof(float) * (size_t)(p->R * p->H * p->D));
    p->c = malloc(sizeof(float) * (size_t)(p->R * p->H));
    p->V = malloc(sizeof(float) * (size_t)(p->R * p->O * p->H));
    if (!p->mu || !p->U || !p->c || !p->V) return 1;
    for (int r = 0; r < p->R; ++r) {
        double n2 = 0.0;
        for (int d = 0; d < p->D; ++d) {
            double v = rng_normal(rng);
            p->mu[r * p->D + d] = (float)v;
            n2 += v * v;
        }
        for (int d = 0; d < p->D; ++d)
            p->mu[r * p->D + d] = (float)(p->mu[r * p->D + d] * p->centre_norm / sqrt(n2));
    }
    /* teacher: unit-variance pre-activations for the noise around the centre, outputs of
     * order 1; each regime's map is unrelated to the others' */
    for (int i = 0; i < p->R * p->H * p->D; ++i) p->U[i] = (float)(rng_normal(rng) * 1.5 / sqrt(p->D));
    for (int i = 0; i < p->R * p->H; ++i) p->c[i] = (float)rng_normal(rng);
    for (int i = 0; i < p->R * p->O * p->H; ++i) p->V[i] = (float)(rng_normal(rng) / sqrt(p->H));
    return 0;
}

void problem_free(problem_t *p) { free(p->mu), free(p->U), free(p->c), free(p->V); }

/* T tokens: x (T, D), y (T, O), regime (T) */
void sample(const problem_t *p, rng_t *rng, int T, float *x, float *y, int *regime) {
    for (int t = 0; t < T; ++t) {
        int r = (int)(rng_next(rng) % (unsigned long long)p->R);
        regime[t] = r;
        float *xt = x + (size_t)t * p->D;
        for (int d = 0; d < p->D; ++d) xt[d] = p->mu[r * p->D + d] + (float)rng_normal(rng);
        for (int o = 0; o < p->O; ++o) y[(size_t)t * p->O + o] = 0.0f;
        for (int h = 0; h < p->H; ++h) {
            /* the teacher looks at the offset from its centre, so regimes do not share a map */
            double a = p->c[r * p->H + h];
            for (int d = 0; d < p->D; ++d)
                a += p->U[(r * p->H + h) * p->D + d] * (xt[d] - p->mu[r * p->D + d]);
            double th = tanh(a);
            for (int o = 0; o < p->O; ++o)
                y[(size_t)t * p->O + o] += (float)(p->V[(r * p->O + o) * p->H + h] * th);
        }
    }
}


int batch_alloc(batch_t *b, const problem_t *p, int T) {
    b->T = T;
    b->x = malloc(sizeof(float) * (size_t)(T > 0 ? T : 1) * (size_t)p->D);
    b->y = malloc(sizeof(float) * (size_t)(T > 0 ? T : 1) * (size_t)p->O);
    b->regime = malloc(sizeof(int) * (size_t)(T > 0 ? T : 1));
    return !b->x || !b->y || !b->regime;
}
void batch_free(batch_t *b) { free(b->x), free(b->y), free(b->regime); }
