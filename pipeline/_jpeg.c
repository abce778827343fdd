/* _vitscale_jpeg (pipeline/_jpeg.c): decode only the part of a JPEG that a crop needs, at the DCT scale it needs.
 *
 * libjpeg(-turbo) can do three things Pillow does not expose (pipeline/decode.py says why each pays):
 *   - scale in the DCT domain by M/8 for any M in 1..8 (Pillow's draft: 1/2, 1/4, 1/8 only);
 *   - skip the IDCT, upsampling and colour conversion of the rows above a crop (jpeg_skip_scanlines)
 *     and of the columns beside it (jpeg_crop_scanline), and stop after its last row;
 *   - write RGBX straight into a caller's buffer (JCS_EXT_RGBX): no PIL image, no copy.
 *
 * Two functions, both taking the JPEG bytes through the buffer protocol and running without the
 * GIL (Pillow's decoder releases it too, so threads in a worker decode in parallel):
 *   header(data) -> (width, height, components, color_space)        no pixel decoded
 *   decode(data, out, scale_num, x0, y0, x1, y1) -> (xoff, width, rows)
 * decode() writes rows [y0, y1) of the image scaled by scale_num/8, columns [xoff, xoff + width)
 * (xoff <= x0 and xoff + width >= x1: libjpeg widens the columns to whole iMCUs), as RGBX, into
 * `out` (a writable contiguous buffer, at least rows * width * 4 bytes; BufferError when it is
 * smaller, naming the size). Bad data raises ValueError with libjpeg's message; data that ends
 * before row y1 ("Premature end of JPEG file"), or whose entropy data is damaged above it, is an
 * error too (see damages_pixels), as it is for Pillow; damage below the region is never seen.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
    int corrupt; /* saw a warning that means wrong pixels (see on_message) */
} ErrorMgr;

static void on_error(j_common_ptr cinfo) {
    ErrorMgr *err = (ErrorMgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* libjpeg reports damaged entropy data as warnings and goes on with grey or garbage blocks; Pillow
 * (whose decode we replace) fails on such images, and so do we: these codes mean that pixels from
 * here on are not the image's. Other warnings (stray bytes between markers, an unknown JFIF
 * version, a bad ICC chunk, data after the image) leave every pixel intact and are ignored. */
static int damages_pixels(int code) {
    switch (code) {
    case JWRN_JPEG_EOF:
    case JWRN_HIT_MARKER:
    case JWRN_HUFF_BAD_CODE:
    case JWRN_ARITH_BAD_CODE:
    case JWRN_MUST_RESYNC:
    case JWRN_NOT_SEQUENTIAL:
    case JWRN_BOGUS_PROGRESSION:
        return 1;
    default:
        return 0;
    }
}

static void on_message(j_common_ptr cinfo, int level) {
    ErrorMgr *err = (ErrorMgr *)cinfo->err;
    if (level < 0) { /* a warning */
        cinfo->err->num_warnings++;
        if (!err->corrupt && damages_pixels(cinfo->err->msg_code)) {
            err->corrupt = 1;
            (*cinfo->err->format_message)(cinfo, err->message);
        }
    }
}

static void silent(j_common_ptr cinfo) { (void)cinfo; }

static void setup(struct jpeg_decompress_struct *cinfo, ErrorMgr *err) {
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->pub.output_message = silent;
    err->message[0] = 0;
    err->corrupt = 0;
}

static PyObject *jpeg_header(PyObject *self, PyObject *args) {
    Py_buffer data;
    struct jpeg_decompress_struct cinfo;
    ErrorMgr err;
    int ok;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*:header", &data))
        return NULL;
    setup(&cinfo, &err);
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.jump)) {
        ok = 0;
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
        jpeg_read_header(&cinfo, TRUE);
        ok = 1;
    }
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (!ok)
        PyErr_Format(PyExc_ValueError, "JPEG header: %s", err.message);
    else if (err.corrupt)
        PyErr_Format(PyExc_ValueError, "JPEG header: %s", err.message);
    else
        result = Py_BuildValue("(kkii)", (unsigned long)cinfo.image_width, (unsigned long)cinfo.image_height,
                               cinfo.num_components, (int)cinfo.jpeg_color_space);
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *jpeg_decode(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int scale_num;
    unsigned long x0, y0, x1, y1;
    struct jpeg_decompress_struct cinfo;
    ErrorMgr err;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*ikkkk:decode", &data, &out, &scale_num, &x0, &y0, &x1, &y1))
        return NULL;
    if (scale_num < 1 || scale_num > 8 || x1 <= x0 || y1 <= y0) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        return PyErr_Format(PyExc_ValueError, "decode: scale_num %d (1..8), box (%lu, %lu, %lu, %lu) must be non-empty",
                            scale_num, x0, y0, x1, y1);
    }
    setup(&cinfo, &err);
    /* 0 ok; 1 libjpeg error; 2 truncated; 3 box outside the scaled image; 4 out too small */
    volatile int status = 0;
    volatile JDIMENSION xoff = (JDIMENSION)x0, width = (JDIMENSION)(x1 - x0);
    volatile unsigned long need = 0, out_w = 0, out_h = 0;
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.jump)) {
        status = 1;
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
        jpeg_read_header(&cinfo, TRUE);
        cinfo.scale_num = (unsigned int)scale_num;
        cinfo.scale_denom = 8;
        cinfo.out_color_space = JCS_EXT_RGBX;
        cinfo.dct_method = JDCT_ISLOW; /* libjpeg's default and Pillow's: the accurate integer IDCT */
        cinfo.do_fancy_upsampling = TRUE;
        jpeg_start_decompress(&cinfo);
        out_w = cinfo.output_width;
        out_h = cinfo.output_height;
        if (x1 > out_w || y1 > out_h) {
            status = 3;
        } else {
            /* Widen the columns by one iMCU each side (where the image goes on): the fancy chroma
             * upsampler treats the cropped region's edges as image edges, so the outermost columns
             * of a crop differ from a full decode's; one iMCU further out they are exact. */
            JDIMENSION pad = (JDIMENSION)(cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size);
            JDIMENSION lo = (JDIMENSION)x0 > pad ? (JDIMENSION)x0 - pad : 0;
            JDIMENSION hi = (JDIMENSION)x1 + pad < cinfo.output_width ? (JDIMENSION)x1 + pad : cinfo.output_width;
            JDIMENSION xo = lo, w = hi - lo;
            if (xo > 0 || w < cinfo.output_width)
                jpeg_crop_scanline(&cinfo, &xo, &w);
            xoff = xo;
            width = w;
            need = (unsigned long)(y1 - y0) * width * 4;
            if (need > (unsigned long)out.len) {
                status = 4;
            } else {
                if (y0 > 0)
                    jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
                unsigned char *base = (unsigned char *)out.buf;
                JSAMPROW rows[16];
                while (cinfo.output_scanline < y1 && !err.corrupt) {
                    JDIMENSION at = cinfo.output_scanline, n = 0;
                    while (n < 16 && at + n < y1) {
                        rows[n] = base + (size_t)(at + n - y0) * width * 4;
                        n++;
                    }
                    if (jpeg_read_scanlines(&cinfo, rows, n) == 0)
                        break;
                }
                if (err.corrupt)
                    status = 2;
            }
        }
        jpeg_abort_decompress(&cinfo); /* we may stop before the last row: abort, not finish */
    }
    Py_END_ALLOW_THREADS
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    switch (status) {
    case 0:
        return Py_BuildValue("(kkk)", (unsigned long)xoff, (unsigned long)width, y1 - y0);
    case 1:
        return PyErr_Format(PyExc_ValueError, "JPEG: %s", err.message);
    case 2:
        return PyErr_Format(PyExc_ValueError, "JPEG data damaged above row %lu (of the image at scale %d/8): %s",
                            y1, scale_num, err.message);
    case 3:
        return PyErr_Format(PyExc_ValueError, "decode: box (%lu, %lu, %lu, %lu) is outside the %lux%lu image at scale %d/8",
                            x0, y0, x1, y1, out_w, out_h, scale_num);
    default:
        return PyErr_Format(PyExc_BufferError, "decode: out holds %zd bytes, the region needs %lu", out.len, need);
    }
}

static PyMethodDef methods[] = {
    {"header", jpeg_header, METH_VARARGS, "header(data) -> (width, height, components, jpeg_color_space)"},
    {"decode", jpeg_decode, METH_VARARGS,
     "decode(data, out, scale_num, x0, y0, x1, y1) -> (xoff, width, rows): RGBX rows [y0, y1), columns "
     "[xoff, xoff + width) of the image scaled by scale_num/8, written into out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vitscale_jpeg", "Region + DCT-scaled JPEG decode (libjpeg-turbo).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__vitscale_jpeg(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER", LIBJPEG_TURBO_VERSION_NUMBER) < 0 ||
        PyModule_AddIntConstant(m, "JCS_GRAYSCALE", JCS_GRAYSCALE) < 0 ||
        PyModule_AddIntConstant(m, "JCS_RGB", JCS_RGB) < 0 || PyModule_AddIntConstant(m, "JCS_YCbCr", JCS_YCbCr) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
