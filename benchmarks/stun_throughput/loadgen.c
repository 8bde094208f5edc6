/*
 * STUN Binding load generator for benchmarks/stun_throughput (Linux only).
 *
 * Keeps a window of outstanding Binding requests on each of several connected
 * UDP sockets, sends and receives in batches with sendmmsg/recvmmsg, validates
 * every response (success class, magic cookie, length, transaction id of a
 * request still outstanding on that socket, XOR-MAPPED-ADDRESS equal to the
 * socket's own address) and counts answered requests.
 *
 * After a warm-up, it measures a window of --duration seconds: answered
 * requests, wall time, its own CPU time and the server's CPU time (utime +
 * stime of /proc/PID/stat, which covers every thread of the process),
 * sampled at the exact start and end of that window. It prints one JSON
 * object on stdout.
 *
 * Bounded: it stops after warm-up + duration, or after --max-requests
 * requests, and alarm() kills it a few seconds later whatever happens.
 * Only loopback destinations are accepted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#define MAX_SOCKETS 64
#define MAX_WINDOW 1024
#define RING 4096 /* power of two, > MAX_WINDOW */
#define BATCH 64
#define RECV_SIZE 1500
#define LOSS_TIMEOUT 0.05 /* seconds without progress before a window is written off */

struct sock {
    int fd;
    uint32_t local_addr; /* network order */
    uint16_t local_port; /* host order */
    uint32_t next_seq;
    int outstanding;
    double last_progress;
    uint32_t ring_seq[RING];
    uint8_t ring_pending[RING];
};

static struct sock socks[MAX_SOCKETS];
static uint32_t run_nonce;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double self_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* utime + stime of a whole process (all threads) in clock ticks, or -1. */
static long long proc_ticks(int pid) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* comm may contain spaces */
    if (!p) return -1;
    p += 2; /* now at field 3 (state) */
    unsigned long long ut = 0, st = 0;
    /* fields 3..13 skipped, 14 utime, 15 stime */
    if (sscanf(p, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (long long)(ut + st);
}

static void put32(uint8_t *b, uint32_t v) {
    b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v;
}
static uint32_t get32(const uint8_t *b) {
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}
static uint16_t get16(const uint8_t *b) { return (uint16_t)((b[0] << 8) | b[1]); }

/* Outcome of one datagram. */
enum { RESP_OK, RESP_BAD, RESP_ERROR_CLASS, RESP_STALE };

static int check_response(struct sock *s, int idx, const uint8_t *b, size_t len) {
    if (len < 20 || (len & 3) != 0) return RESP_BAD;
    uint16_t type = get16(b);
    if (get16(b + 2) + 20u != len || get32(b + 4) != 0x2112A442u) return RESP_BAD;
    if (get32(b + 8) != run_nonce || get32(b + 12) != (uint32_t)idx) return RESP_BAD;
    uint32_t seq = get32(b + 16);
    uint32_t slot = seq & (RING - 1);
    if (s->next_seq - seq > RING || seq >= s->next_seq || s->ring_seq[slot] != seq ||
        !s->ring_pending[slot])
        return RESP_STALE;
    if (type == 0x0111) return RESP_ERROR_CLASS;
    if (type != 0x0101) return RESP_BAD;
    /* find XOR-MAPPED-ADDRESS and check it names this socket */
    size_t off = 20;
    int mapped_ok = 0;
    while (off + 4 <= len) {
        uint16_t at = get16(b + off), al = get16(b + off + 2);
        if (off + 4 + al > len) return RESP_BAD;
        if (at == 0x0020) {
            if (al != 8 || b[off + 5] != 0x01) return RESP_BAD;
            uint16_t port = get16(b + off + 6) ^ 0x2112;
            uint32_t addr = get32(b + off + 8) ^ 0x2112A442u;
            if (port != s->local_port || htonl(addr) != s->local_addr) return RESP_BAD;
            mapped_ok = 1;
        }
        off += 4 + ((al + 3u) & ~3u);
    }
    if (!mapped_ok) return RESP_BAD;
    return RESP_OK;
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s --port P [--host 127.0.0.1] [--duration S] [--warmup S]\n"
            "          [--max-requests N] [--sockets N] [--window N] [--server-pid PID]\n",
            argv0);
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, nsock = 8, window = 16, server_pid = 0;
    double duration = 4.0, warmup = 0.5;
    long long max_requests = 20000000LL;
    static struct option opts[] = {
        {"host", required_argument, 0, 'h'},     {"port", required_argument, 0, 'p'},
        {"duration", required_argument, 0, 'd'}, {"warmup", required_argument, 0, 'w'},
        {"max-requests", required_argument, 0, 'm'}, {"sockets", required_argument, 0, 's'},
        {"window", required_argument, 0, 'W'},   {"server-pid", required_argument, 0, 'P'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'm': max_requests = atoll(optarg); break;
        case 's': nsock = atoi(optarg); break;
        case 'W': window = atoi(optarg); break;
        case 'P': server_pid = atoi(optarg); break;
        default: usage(argv[0]);
        }
    }
    if (port <= 0 || port > 65535 || nsock < 1 || nsock > MAX_SOCKETS || window < 1 ||
        window > MAX_WINDOW || duration <= 0 || duration > 60 || warmup < 0 || warmup > 10 ||
        max_requests < 1)
        usage(argv[0]);

    struct sockaddr_in dst = {0};
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1 ||
        (ntohl(dst.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "loadgen: --host must be an IPv4 loopback address\n");
        return 2;
    }

    /* Hard bounds: die with the parent, and never outlive the planned run. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    alarm((unsigned)(warmup + duration) + 5);

    srand((unsigned)(time(NULL) ^ getpid()));
    run_nonce = ((uint32_t)rand() << 16) ^ (uint32_t)rand();

    struct pollfd pfds[MAX_SOCKETS];
    for (int i = 0; i < nsock; i++) {
        struct sock *s = &socks[i];
        s->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (s->fd < 0) { perror("socket"); return 1; }
        int buf = 4 << 20;
        setsockopt(s->fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf);
        setsockopt(s->fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf);
        if (connect(s->fd, (struct sockaddr *)&dst, sizeof dst) < 0) {
            perror("connect");
            return 1;
        }
        struct sockaddr_in local;
        socklen_t ll = sizeof local;
        getsockname(s->fd, (struct sockaddr *)&local, &ll);
        s->local_addr = local.sin_addr.s_addr;
        s->local_port = ntohs(local.sin_port);
        pfds[i].fd = s->fd;
        pfds[i].events = POLLIN;
    }

    static uint8_t sendbuf[BATCH][20];
    static uint8_t recvbuf[BATCH][RECV_SIZE];
    struct mmsghdr smsg[BATCH], rmsg[BATCH];
    struct iovec siov[BATCH], riov[BATCH];
    memset(smsg, 0, sizeof smsg);
    memset(rmsg, 0, sizeof rmsg);
    for (int k = 0; k < BATCH; k++) {
        siov[k].iov_base = sendbuf[k];
        siov[k].iov_len = 20;
        smsg[k].msg_hdr.msg_iov = &siov[k];
        smsg[k].msg_hdr.msg_iovlen = 1;
        riov[k].iov_base = recvbuf[k];
        riov[k].iov_len = RECV_SIZE;
        rmsg[k].msg_hdr.msg_iov = &riov[k];
        rmsg[k].msg_hdr.msg_iovlen = 1;
    }

    long long sent = 0, answered = 0, lost = 0, bad = 0, stale = 0, err_class = 0;
    long long send_errors = 0, refused = 0;
    double t0 = now_s();
    double t_start = t0 + warmup, t_end = t_start + duration;
    int measuring = 0, done = 0;
    /* window start: taken now, and again at the end of the warm-up; if the request cap stops
     * the run during the warm-up, the window is the whole run */
    long long m_answered0 = 0, m_ticks0 = server_pid ? proc_ticks(server_pid) : -1, m_ticks1 = -1;
    double m_t0 = t0, m_t1 = 0, m_cpu0 = self_cpu_s(), m_cpu1 = 0;
    long long m_answered1 = 0;
    for (int i = 0; i < nsock; i++) socks[i].last_progress = t0;

    while (!done) {
        double now = now_s();
        if (!measuring && now >= t_start) {
            measuring = 1;
            m_ticks0 = server_pid ? proc_ticks(server_pid) : -1;
            m_t0 = now_s();
            m_cpu0 = self_cpu_s();
            m_answered0 = answered;
        }
        if (measuring && now >= t_end) {
            m_ticks1 = server_pid ? proc_ticks(server_pid) : -1;
            m_t1 = now_s();
            m_cpu1 = self_cpu_s();
            m_answered1 = answered;
            done = 1;
            break;
        }
        long long got_total = 0;
        for (int i = 0; i < nsock; i++) {
            struct sock *s = &socks[i];
            /* receive */
            for (;;) {
                for (int k = 0; k < BATCH; k++) rmsg[k].msg_hdr.msg_flags = 0;
                int n = recvmmsg(s->fd, rmsg, BATCH, MSG_DONTWAIT, NULL);
                if (n <= 0) {
                    if (n < 0 && errno == ECONNREFUSED) refused++;
                    break;
                }
                got_total += n;
                for (int k = 0; k < n; k++) {
                    const uint8_t *b = recvbuf[k];
                    int r = check_response(s, i, b, rmsg[k].msg_len);
                    if (r == RESP_STALE) { stale++; continue; }
                    if (r == RESP_BAD) { bad++; }
                    else if (r == RESP_ERROR_CLASS) { err_class++; }
                    else { answered++; }
                    /* a validated, pending transaction: retire it either way */
                    if (r != RESP_BAD) {
                        uint32_t seq = get32(b + 16);
                        s->ring_pending[seq & (RING - 1)] = 0;
                        s->outstanding--;
                        s->last_progress = now;
                    }
                }
                if (n < BATCH) break;
            }
            /* write off a stalled window (requests or responses dropped) */
            if (s->outstanding > 0 && now - s->last_progress > LOSS_TIMEOUT) {
                lost += s->outstanding;
                memset(s->ring_pending, 0, sizeof s->ring_pending);
                s->outstanding = 0;
                s->last_progress = now;
            }
            /* refill the window */
            int want = window - s->outstanding;
            if (want > BATCH) want = BATCH;
            if (sent + want > max_requests) want = (int)(max_requests - sent);
            if (want > 0) {
                for (int k = 0; k < want; k++) {
                    uint8_t *q = sendbuf[k];
                    uint32_t seq = s->next_seq + (uint32_t)k;
                    q[0] = 0x00; q[1] = 0x01; q[2] = 0; q[3] = 0;
                    put32(q + 4, 0x2112A442u);
                    put32(q + 8, run_nonce);
                    put32(q + 12, (uint32_t)i);
                    put32(q + 16, seq);
                }
                int n = sendmmsg(s->fd, smsg, (unsigned)want, MSG_DONTWAIT);
                if (n < 0) {
                    if (errno == ECONNREFUSED) refused++;
                    else send_errors++;
                    n = 0;
                }
                for (int k = 0; k < n; k++) {
                    uint32_t seq = s->next_seq++;
                    uint32_t slot = seq & (RING - 1);
                    s->ring_seq[slot] = seq;
                    s->ring_pending[slot] = 1;
                }
                if (s->outstanding == 0 && n > 0) s->last_progress = now;
                s->outstanding += n;
                sent += n;
            }
        }
        if (sent >= max_requests) {
            int any = 0;
            for (int i = 0; i < nsock; i++) any |= socks[i].outstanding > 0;
            if (!any) break; /* cap reached and everything settled */
        }
        if (got_total == 0) poll(pfds, (nfds_t)nsock, 1);
    }
    if (!done) { /* stopped by the request cap */
        m_ticks1 = server_pid ? proc_ticks(server_pid) : -1;
        m_t1 = now_s();
        m_cpu1 = self_cpu_s();
        m_answered1 = answered;
    }

    long tck = sysconf(_SC_CLK_TCK);
    double server_cpu = (m_ticks0 >= 0 && m_ticks1 >= 0) ? (double)(m_ticks1 - m_ticks0) / (double)tck
                                                        : -1.0;
    printf("{\"answered\": %lld, \"wall_s\": %.6f, \"server_cpu_s\": %.4f, "
           "\"loadgen_cpu_s\": %.4f, \"capped\": %s, \"total_sent\": %lld, "
           "\"total_answered\": %lld, \"lost\": %lld, \"bad\": %lld, \"stale\": %lld, "
           "\"error_responses\": %lld, \"send_errors\": %lld, \"refused\": %lld, "
           "\"sockets\": %d, \"window\": %d}\n",
           m_answered1 - m_answered0, m_t1 - m_t0, server_cpu, m_cpu1 - m_cpu0,
           done ? "false" : "true", sent, answered, lost, bad, stale, err_class, send_errors,
           refused, nsock, window);
    return 0;
}
