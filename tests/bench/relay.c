/* relay.c: a two-way UDP relay that makes a link lossy, for the bench's lossy-link row (this
 * kernel has no netem). Compiled by rounds.sh at bench time (cc -O2); never committed as a binary.
 *
 *   relay [-d DELAY_MS] [-j JITTER_MS] [-l LOSS_PCT] [-r REORDER_PCT] [-h HOLD_MS] [-u DUP_PCT]
 *         [-c CORRUPT_PCT] [-t SECONDS] [-s STATS_FILE] A_LISTEN A_PEER B_LISTEN B_PEER
 *                                                                 (addresses IPv4 ADDR:PORT)
 *
 * A datagram that arrives on socket A_LISTEN (from the a side) leaves from socket B_LISTEN towards
 * B_PEER, and one arriving on B_LISTEN leaves from A_LISTEN towards A_PEER; each peer therefore
 * talks to one fixed relay address and sees its answers come from there. Per direction, every
 * datagram is dropped with probability LOSS_PCT, else scheduled DELAY_MS (+ up to JITTER_MS,
 * uniform) after its arrival; with probability REORDER_PCT it is held HOLD_MS longer (default:
 * half the delay, at least 1 ms), so datagrams sent after it overtake it. With probability DUP_PCT
 * a datagram that passes is scheduled twice (the copy on its own delay and reorder draws), and with
 * probability CORRUPT_PCT one random bit of it is flipped (of the copy too). A timer heap per
 * direction releases the datagrams in order of their due time. The relay ends on SIGTERM/SIGINT or
 * after SECONDS (default 600) and writes one line per direction to STATS_FILE (else stderr):
 *   dir=ab in=N dropped=N held=N duplicated=N corrupted=N out=N overflow=N
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { MAX_DGRAM = 2048, CAPACITY = 16384 };

struct slot { uint64_t due, seq; uint16_t len; unsigned char data[MAX_DGRAM]; };

struct lane {                   /* one direction */
	int in, out;                /* receive on in, send from out */
	struct sockaddr_in to;
	struct slot *slots;         /* the datagrams waiting */
	uint32_t *heap, *free_list; /* heap of slot indices by (due, seq); unused slot indices */
	uint32_t heap_n, free_n;
	uint64_t seq, n_in, n_dropped, n_held, n_duplicated, n_corrupted, n_out, n_overflow;
	const char *name;
};

static volatile sig_atomic_t stopping;
static uint64_t rng_state;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double uniform(void) /* splitmix64, in [0, 1) */
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
	return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}

static int parse_addr(const char *text, struct sockaddr_in *sa)
{
	char host[64];
	const char *colon = strrchr(text, ':');
	if (!colon || (size_t)(colon - text) >= sizeof host) return -1;
	memcpy(host, text, (size_t)(colon - text));
	host[colon - text] = 0;
	memset(sa, 0, sizeof *sa);
	sa->sin_family = AF_INET;
	sa->sin_port = htons((uint16_t)atoi(colon + 1));
	return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

static int open_socket(const struct sockaddr_in *sa)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), size = 4 << 20;
	if (fd < 0) { perror("socket"); exit(1); }
	/* as root the FORCE variants pass net.core.{r,w}mem_max; else the plain ones cap quietly */
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size))
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size))
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
	if (bind(fd, (const struct sockaddr *)sa, sizeof *sa)) { perror("bind"); exit(1); }
	return fd;
}

static int earlier(const struct lane *l, uint32_t x, uint32_t y)
{
	const struct slot *a = &l->slots[x], *b = &l->slots[y];
	return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void heap_push(struct lane *l, uint32_t idx)
{
	uint32_t i = l->heap_n++;
	while (i > 0) {
		uint32_t parent = (i - 1) / 2;
		if (!earlier(l, idx, l->heap[parent])) break;
		l->heap[i] = l->heap[parent];
		i = parent;
	}
	l->heap[i] = idx;
}

static uint32_t heap_pop(struct lane *l)
{
	uint32_t top = l->heap[0], last = l->heap[--l->heap_n], i = 0;
	for (;;) {
		uint32_t child = 2 * i + 1;
		if (child >= l->heap_n) break;
		if (child + 1 < l->heap_n && earlier(l, l->heap[child + 1], l->heap[child])) child++;
		if (!earlier(l, l->heap[child], last)) break;
		l->heap[i] = l->heap[child];
		i = child;
	}
	if (l->heap_n) l->heap[i] = last;
	return top;
}

static void lane_init(struct lane *l, const char *name, int in, int out, const struct sockaddr_in *to)
{
	memset(l, 0, sizeof *l);
	l->name = name, l->in = in, l->out = out, l->to = *to;
	l->slots = malloc(sizeof *l->slots * CAPACITY);
	l->heap = malloc(sizeof *l->heap * CAPACITY);
	l->free_list = malloc(sizeof *l->free_list * CAPACITY);
	if (!l->slots || !l->heap || !l->free_list) { perror("malloc"); exit(1); }
	for (uint32_t i = 0; i < CAPACITY; i++) l->free_list[i] = CAPACITY - 1 - i;
	l->free_n = CAPACITY;
}

struct shape { uint64_t delay, jitter, hold; double loss, reorder, dup, corrupt; };

/* take in what the socket has (a bounded number per call, so the other lane gets its turn) */
static void lane_receive(struct lane *l, const struct shape *s)
{
	static unsigned char buf[65536];
	for (int n = 0; n < 256; n++) {
		ssize_t len = recv(l->in, buf, sizeof buf, MSG_DONTWAIT);
		if (len < 0) return;
		l->n_in++;
		if (uniform() < s->loss) { l->n_dropped++; continue; }
		if (len > MAX_DGRAM) { l->n_overflow++; continue; }
		if (len > 0 && uniform() < s->corrupt) {
			buf[(size_t)(uniform() * (double)len)] ^= (unsigned char)(1u << (int)(uniform() * 8));
			l->n_corrupted++;
		}
		int copies = uniform() < s->dup ? 2 : 1;
		if (copies == 2) l->n_duplicated++;
		for (int c = 0; c < copies; c++) {
			if (l->free_n == 0) { l->n_overflow++; break; }
			uint32_t idx = l->free_list[--l->free_n];
			struct slot *slot = &l->slots[idx];
			slot->due = now_ns() + s->delay + (s->jitter ? (uint64_t)(uniform() * (double)s->jitter) : 0);
			if (s->reorder > 0 && uniform() < s->reorder) { slot->due += s->hold; l->n_held++; }
			slot->seq = l->seq++;
			slot->len = (uint16_t)len;
			memcpy(slot->data, buf, (size_t)len);
			heap_push(l, idx);
		}
	}
}

/* send every datagram that is due; one the socket will not take now is counted and dropped */
static void lane_release(struct lane *l, uint64_t now)
{
	while (l->heap_n && l->slots[l->heap[0]].due <= now) {
		uint32_t idx = heap_pop(l);
		struct slot *slot = &l->slots[idx];
		if (sendto(l->out, slot->data, slot->len, MSG_DONTWAIT, (const struct sockaddr *)&l->to, sizeof l->to) == slot->len)
			l->n_out++;
		else
			l->n_overflow++;
		l->free_list[l->free_n++] = idx;
	}
}

int main(int argc, char **argv)
{
	struct shape s = { 0 };
	double delay_ms = 0, hold_ms = -1;
	int seconds = 600, opt;
	const char *stats = NULL;
	while ((opt = getopt(argc, argv, "d:j:l:r:h:u:c:t:s:")) != -1) {
		switch (opt) {
		case 'd': delay_ms = atof(optarg); break;
		case 'j': s.jitter = (uint64_t)(atof(optarg) * 1e6); break;
		case 'l': s.loss = atof(optarg) / 100; break;
		case 'r': s.reorder = atof(optarg) / 100; break;
		case 'h': hold_ms = atof(optarg); break;
		case 'u': s.dup = atof(optarg) / 100; break;
		case 'c': s.corrupt = atof(optarg) / 100; break;
		case 't': seconds = atoi(optarg); break;
		case 's': stats = optarg; break;
		default: fprintf(stderr, "usage: relay [-d ms] [-j ms] [-l %%] [-r %%] [-h ms] [-u %%] [-c %%] [-t s] [-s file] A_LISTEN A_PEER B_LISTEN B_PEER\n"); return 2;
		}
	}
	struct sockaddr_in a_listen, a_peer, b_listen, b_peer;
	if (argc - optind != 4 || parse_addr(argv[optind], &a_listen) || parse_addr(argv[optind + 1], &a_peer) ||
	    parse_addr(argv[optind + 2], &b_listen) || parse_addr(argv[optind + 3], &b_peer)) {
		fprintf(stderr, "relay: want four IPv4 ADDR:PORT arguments\n");
		return 2;
	}
	if (delay_ms < 0 || s.loss < 0 || s.loss > 1 || s.reorder < 0 || s.reorder > 1 || s.dup < 0 || s.dup > 1 ||
	    s.corrupt < 0 || s.corrupt > 1 || seconds < 1) {
		fprintf(stderr, "relay: bad option value\n");
		return 2;
	}
	s.delay = (uint64_t)(delay_ms * 1e6);
	s.hold = (uint64_t)((hold_ms >= 0 ? hold_ms : (delay_ms / 2 > 1 ? delay_ms / 2 : 1)) * 1e6);
	rng_state = now_ns() ^ ((uint64_t)getpid() << 32);

	struct sigaction sa = { 0 };
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	int fd_a = open_socket(&a_listen), fd_b = open_socket(&b_listen);
	struct lane lanes[2];
	lane_init(&lanes[0], "ab", fd_a, fd_b, &b_peer);
	lane_init(&lanes[1], "ba", fd_b, fd_a, &a_peer);

	uint64_t end = now_ns() + (uint64_t)seconds * 1000000000u;
	while (!stopping) {
		uint64_t now = now_ns(), wake = now + 100000000u; /* at least every 100 ms */
		if (now >= end) break;
		for (int i = 0; i < 2; i++) {
			lane_release(&lanes[i], now);
			if (lanes[i].heap_n && lanes[i].slots[lanes[i].heap[0]].due < wake) wake = lanes[i].slots[lanes[i].heap[0]].due;
		}
		struct pollfd fds[2] = { { fd_a, POLLIN, 0 }, { fd_b, POLLIN, 0 } };
		uint64_t wait = wake > now ? wake - now : 0;
		struct timespec ts = { (time_t)(wait / 1000000000u), (long)(wait % 1000000000u) };
		int ready = ppoll(fds, 2, &ts, NULL);
		if (ready < 0 && errno != EINTR) { perror("ppoll"); break; }
		for (int i = 0; i < 2; i++)
			if (ready > 0 && (fds[i].revents & POLLIN)) lane_receive(&lanes[i], &s);
	}

	FILE *out = stats ? fopen(stats, "w") : NULL;
	if (!out) out = stderr;
	for (int i = 0; i < 2; i++) {
		const struct lane *l = &lanes[i];
		fprintf(out, "dir=%s in=%llu dropped=%llu held=%llu duplicated=%llu corrupted=%llu out=%llu overflow=%llu\n",
			l->name, (unsigned long long)l->n_in, (unsigned long long)l->n_dropped, (unsigned long long)l->n_held,
			(unsigned long long)l->n_duplicated, (unsigned long long)l->n_corrupted,
			(unsigned long long)l->n_out, (unsigned long long)l->n_overflow);
	}
	if (out != stderr) fclose(out);
	return 0;
}
