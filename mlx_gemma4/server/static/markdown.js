// A small Markdown renderer for answers: code blocks, headings, lists, quotes, paragraphs,
// inline code, bold, italics and http(s) links. It builds DOM nodes (never HTML strings), so
// whatever the model writes stays text; what it does not recognise is shown as written.
"use strict";

const FENCE = /^\s{0,3}(```|~~~)\s*([\w+-]*)\s*$/;
const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s{0,3}>\s?(.*)$/;
const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
// inline: `code`, **bold** / __bold__, *italic* / _italic_, [text](http...)
const INLINE =
  /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([\s\S]*?[^\s*])\*|(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/;

function element(tag, children = [], className = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);
  return node;
}

function renderInline(text) {
  const nodes = [];
  let rest = text;
  for (let match = INLINE.exec(rest); match; match = INLINE.exec(rest)) {
    if (match.index) nodes.push(rest.slice(0, match.index));
    const [whole, , code, bold1, bold2, italic1, italic2, label, url] = match;
    if (code !== undefined) {
      nodes.push(element("code", [code.length > 2 && code.startsWith(" ") && code.endsWith(" ") ? code.slice(1, -1) : code]));
    } else if (bold1 !== undefined || bold2 !== undefined) {
      nodes.push(element("strong", renderInline(bold1 ?? bold2)));
    } else if (italic1 !== undefined || italic2 !== undefined) {
      nodes.push(element("em", renderInline(italic1 ?? italic2)));
    } else {
      const link = element("a", renderInline(label));
      link.href = url;
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      nodes.push(link);
    }
    rest = rest.slice(match.index + whole.length);
  }
  if (rest) nodes.push(rest);
  return nodes;
}

// Lines joined into a paragraph keep their line breaks (models often mean them).
function withBreaks(lines) {
  const nodes = [];
  lines.forEach((line, i) => {
    if (i) nodes.push(document.createElement("br"));
    nodes.push(...renderInline(line));
  });
  return nodes;
}

function renderList(lines, start, pattern, ordered) {
  const list = element(ordered ? "ol" : "ul");
  let i = start;
  let item = null;
  while (i < lines.length) {
    const match = pattern.exec(lines[i]);
    if (match) {
      if (ordered && !item && match[1] !== "1") list.start = Number(match[1]);
      item = element("li", renderInline(ordered ? match[2] : match[1]));
      list.append(item);
    } else if (item && /^\s{2,}\S/.test(lines[i])) {
      item.append(document.createElement("br"), ...renderInline(lines[i].trim()));
    } else {
      break;
    }
    i += 1;
  }
  return [list, i];
}

// Markdown `text` as a DocumentFragment. An unclosed code fence (an answer still streaming)
// runs to the end of the text.
function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.split("\n");
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) fragment.append(element("p", withBreaks(paragraph)));
    paragraph = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if ((match = FENCE.exec(line))) {
      flush();
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(match[1])) body.push(lines[i++]);
      const code = element("code", [body.join("\n")]);
      if (match[2]) code.dataset.language = match[2];
      fragment.append(element("pre", [code]));
      i += 1;
    } else if ((match = HEADING.exec(line))) {
      flush();
      fragment.append(element(`h${Math.min(6, match[1].length + 2)}`, renderInline(match[2])));
      i += 1;
    } else if (RULE.test(line)) {
      flush();
      fragment.append(document.createElement("hr"));
      i += 1;
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      flush();
      const ordered = !BULLET.test(line);
      const [list, next] = renderList(lines, i, ordered ? NUMBERED : BULLET, ordered);
      fragment.append(list);
      i = next;
    } else if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
        quoted.push(match[1]);
        i += 1;
      }
      fragment.append(element("blockquote", [renderMarkdown(quoted.join("\n"))]));
    } else if (!line.trim()) {
      flush();
      i += 1;
    } else {
      paragraph.push(line);
      i += 1;
    }
  }
  flush();
  return fragment;
}
