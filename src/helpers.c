// SPDX-License-Identifier: GPL-2.0
/*
 * Non-inline wrappers of the static inline functions and macros that
 * virtio_vsock_rs needs; declared in bindings_helper.h.
 */
#include "bindings_helper.h"

bool vsock_rs_virtio_has_feature(const struct virtio_device *vdev,
				 unsigned int fbit)
{
	return virtio_has_feature(vdev, fbit);
}

/*
 * A little-endian 64-bit field, as virtio_vsock_update_guest_cid() reads
 * guest_cid: virtio_cread64() would be native-endian on a legacy device.
 */
u64 vsock_rs_virtio_cread_le64(struct virtio_device *vdev, unsigned int offset)
{
	__le64 v;

	virtio_cread_bytes(vdev, offset, &v, sizeof(v));
	return le64_to_cpu(v);
}

int vsock_rs_virtio_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
			     struct virtqueue *vqs[],
			     struct virtqueue_info vqs_info[])
{
	return virtio_find_vqs(vdev, nvqs, vqs, vqs_info, NULL);
}

void vsock_rs_virtio_del_vqs(struct virtio_device *vdev)
{
	vdev->config->del_vqs(vdev);
}

size_t vsock_rs_virtio_nr_vqs(struct virtio_device *vdev)
{
	return list_count_nodes(&vdev->vqs);
}

void vsock_rs_virtio_device_ready(struct virtio_device *vdev)
{
	virtio_device_ready(vdev);
}

struct virtio_device *vsock_rs_dev_to_virtio(struct device *dev)
{
	return dev_to_virtio(dev);
}

void vsock_rs_kfree_skb(struct sk_buff *skb)
{
	kfree_skb(skb);
}

/*
 * Spare order-0 pages for rx fragments. A received payload shorter than its
 * buffer leaves fragment pages nobody reads: vsock_rs_skb_rx_put() keeps
 * them here and vsock_rs_alloc_rx_skb() hangs them on the next buffer, so a
 * stream of small packets does not free and allocate 16 pages per packet.
 * The pool only holds pages of buffers consumed since the last refill, so
 * posted and spare pages together stay within what the ring may hold.
 * Only the rx path uses a pool, under the device's rx lock.
 */
struct vsock_rs_page_pool {
	unsigned int nr;
	unsigned int max;
	struct page *pages[];
};

struct vsock_rs_page_pool *vsock_rs_page_pool_new(unsigned int max, gfp_t gfp)
{
	struct vsock_rs_page_pool *pool;

	pool = kmalloc(struct_size(pool, pages, max), gfp);
	if (!pool)
		return NULL;
	pool->nr = 0;
	pool->max = max;
	return pool;
}

void vsock_rs_page_pool_free(struct vsock_rs_page_pool *pool)
{
	while (pool->nr)
		put_page(pool->pages[--pool->nr]);
	kfree(pool);
}

static struct page *page_pool_get(struct vsock_rs_page_pool *pool, gfp_t gfp)
{
	if (pool->nr)
		return pool->pages[--pool->nr];
	return alloc_page(gfp);
}

/* Keeps a page only if nothing else holds it and it is an ordinary one. */
static void page_pool_put(struct vsock_rs_page_pool *pool, struct page *page)
{
	if (pool->nr < pool->max && page_ref_count(page) == 1 &&
	    !page_is_pfmemalloc(page))
		pool->pages[pool->nr++] = page;
	else
		put_page(page);
}

/*
 * An rx buffer: a linear part of linear bytes (header included), as
 * virtio_vsock_alloc_linear_skb(), then frags bytes in order-0 pages hung as
 * fragments, from the pool first (as alloc_skb_with_frags() with order 0,
 * setting neither len nor data_len: vsock_rs_skb_rx_put() does once the
 * device has written).
 */
struct sk_buff *vsock_rs_alloc_rx_skb(unsigned int linear, unsigned int frags,
				      gfp_t mask,
				      struct vsock_rs_page_pool *pool)
{
	struct sk_buff *skb;
	int i = 0;

	if (DIV_ROUND_UP(frags, PAGE_SIZE) > MAX_SKB_FRAGS)
		return NULL;
	skb = alloc_skb(linear, mask);
	if (!skb)
		return NULL;
	while (frags) {
		unsigned int chunk = min_t(unsigned int, frags, PAGE_SIZE);
		struct page *page = page_pool_get(pool, mask);

		if (!page) {
			kfree_skb(skb);
			return NULL;
		}
		skb_fill_page_desc(skb, i++, page, 0, chunk);
		skb->truesize += PAGE_SIZE;
		frags -= chunk;
	}
	skb_reserve(skb, VIRTIO_VSOCK_SKB_HEADROOM);
	return skb;
}

/*
 * The device wrote len payload bytes after the header, into the linear
 * room of linear bytes (as posted) and then the fragments: make them the
 * skb's data, give the fragments past them to the pool, and trim the rest,
 * so that a payload that fits the linear room leaves a linear skb (the
 * common code coalesces only those).
 */
int vsock_rs_skb_rx_put(struct sk_buff *skb, u32 linear, u32 len,
			struct vsock_rs_page_pool *pool)
{
	struct skb_shared_info *shinfo = skb_shinfo(skb);
	u32 frags = 0, reach = linear;
	int i, keep = 0;

	for (i = 0; i < shinfo->nr_frags; i++)
		frags += skb_frag_size(&shinfo->frags[i]);
	if (skb->len || skb->data_len || linear > skb_tailroom(skb) ||
	    len > linear + frags)
		return -EINVAL;
	while (keep < shinfo->nr_frags && reach < len)
		reach += skb_frag_size(&shinfo->frags[keep++]);
	for (i = shinfo->nr_frags - 1; i >= keep; i--) {
		frags -= skb_frag_size(&shinfo->frags[i]);
		page_pool_put(pool, skb_frag_page(&shinfo->frags[i]));
		skb->truesize -= PAGE_SIZE;
	}
	shinfo->nr_frags = keep;
	skb_put(skb, linear);
	skb->data_len = frags;
	skb->len += frags;
	return pskb_trim(skb, len);
}

/*
 * Frees an rx skb that nobody else holds, its fragment pages to the pool
 * first: a packet the driver drops then costs no page allocation on the
 * next refill, however many the device sends.
 */
void vsock_rs_skb_free_to_pool(struct sk_buff *skb,
			       struct vsock_rs_page_pool *pool)
{
	struct skb_shared_info *shinfo = skb_shinfo(skb);

	/* The skb is freed next: only its fragment count must stay true. */
	if (!skb_cloned(skb) && !skb_shared(skb))
		while (shinfo->nr_frags)
			page_pool_put(pool,
				      skb_frag_page(&shinfo->frags[--shinfo->nr_frags]));
	kfree_skb(skb);
}

/* The rx buffer payload size, a module parameter (see RxLayout). */
static unsigned int rx_buf_size = 65536;
module_param(rx_buf_size, uint, 0444);
MODULE_PARM_DESC(rx_buf_size,
		 "Largest payload per rx buffer, 3732 (one page, as the C driver) to 65536: the first page is linear, the rest order-0 page fragments; buffers are sized to the packets arriving");

unsigned int vsock_rs_rx_buf_size_param(void)
{
	return rx_buf_size;
}

struct virtio_vsock_hdr *vsock_rs_skb_hdr(struct sk_buff *skb)
{
	return virtio_vsock_hdr(skb);
}

unsigned int vsock_rs_skb_tailroom(struct sk_buff *skb)
{
	return skb_tailroom(skb);
}

bool vsock_rs_skb_reply(struct sk_buff *skb)
{
	return virtio_vsock_skb_reply(skb);
}

bool vsock_rs_skb_is_nonlinear(struct sk_buff *skb)
{
	return skb_is_nonlinear(skb);
}

unsigned int vsock_rs_skb_headroom(struct sk_buff *skb)
{
	return skb_headroom(skb);
}

unsigned int vsock_rs_skb_nr_frags(struct sk_buff *skb)
{
	return skb_shinfo(skb)->nr_frags;
}

unsigned int vsock_rs_skb_frags_len(struct sk_buff *skb)
{
	struct skb_shared_info *shinfo = skb_shinfo(skb);
	unsigned int i, len = 0;

	for (i = 0; i < shinfo->nr_frags; i++)
		len += skb_frag_size(&shinfo->frags[i]);
	return len;
}

/*
 * As virtio_transport_send_skb(): page_to_virt() of a user page is fine,
 * the virtio and DMA layers only use it to compute the physical address.
 */
void *vsock_rs_skb_frag_virt(struct sk_buff *skb, unsigned int i,
			     unsigned int *len)
{
	skb_frag_t *frag = &skb_shinfo(skb)->frags[i];

	*len = skb_frag_size(frag);
	return page_to_virt(skb_frag_page(frag)) + skb_frag_off(frag);
}

void vsock_rs_skb_queue_head_init(struct sk_buff_head *list)
{
	skb_queue_head_init(list);
}

void vsock_rs_skb_queue_head(struct sk_buff_head *list, struct sk_buff *skb)
{
	virtio_vsock_skb_queue_head(list, skb);
}

void vsock_rs_skb_queue_tail(struct sk_buff_head *list, struct sk_buff *skb)
{
	virtio_vsock_skb_queue_tail(list, skb);
}

struct sk_buff *vsock_rs_skb_dequeue(struct sk_buff_head *list)
{
	return virtio_vsock_skb_dequeue(list);
}

void vsock_rs_skb_queue_purge(struct sk_buff_head *list)
{
	virtio_vsock_skb_queue_purge(list);
}

bool vsock_rs_skb_queue_empty_lockless(const struct sk_buff_head *list)
{
	return skb_queue_empty_lockless(list);
}

void vsock_rs_rcu_read_lock(void)
{
	rcu_read_lock();
}

void vsock_rs_rcu_read_unlock(void)
{
	rcu_read_unlock();
}

void vsock_rs_mutex_lock(struct mutex *lock)
{
	mutex_lock(lock);
}

/* As virtio_vsock_reset_sock(): called under vsock_table_lock. */
void vsock_rs_reset_sock(struct sock *sk)
{
	sk->sk_state = TCP_CLOSE;
	sk->sk_err = ECONNRESET;
	sk_error_report(sk);
}

#ifdef VSOCK_RS_KERNEL_7_3
/* Whether vsk's network namespace is in global vsock mode (7.3's netns). */
bool vsock_rs_net_mode_global(struct vsock_sock *vsk)
{
	return vsock_net_mode_global(vsk);
}
#endif

/* Keeps the module of vdev's driver loaded for good (a leaked device). */
void vsock_rs_pin_driver_module(struct virtio_device *vdev)
{
	__module_get(vdev->dev.driver->owner);
}

/* Lockdep needs a key for attributes that are not static. */
void vsock_rs_sysfs_attr_init(struct attribute *attr)
{
	sysfs_attr_init(attr);
}

ssize_t vsock_rs_sysfs_emit_u64(char *buf, u64 value)
{
	return sysfs_emit(buf, "%llu\n", value);
}
